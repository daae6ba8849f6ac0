"""The model's own op list (``medvae.models.ops``), grouped into steps that each run on one tile.

``network_steps`` takes ``encoder.ops()`` or ``decoder.ops()`` — the very list the model's forward
runs — and groups it into steps, one per op that changes the voxels' neighbourhood (its "head"),
each followed by the pointwise ops after it (Activation, Dropout, ResidualClose). A step maps the
whole-volume tensor T_i to T_{i+1}, knows per spatial axis which input interval one output interval
needs, and runs its ops on a tile with the ops' own ``run`` methods (the same kernels as one pass):

- ``ConvStep`` (head Conv or NearestUpsampleConv): the tile is cut to the input the convolution
  needs, zero-padded only where the whole volume's zero padding would be, and convolved without
  padding; the result equals the same voxels of the one-pass result.
- ``NormStep`` (head Norm): GroupNorm with statistics of the WHOLE volume, gathered by the caller
  (``medvae.inference.statistics``) with the same reduction one pass uses.
- ``WholeStep`` (head SelfAttention): runs on the whole tensor.
- ``PointwiseStep``: pointwise ops with no head before them (e.g. right after a ResidualOpen).

A ResidualOpen before a head marks its step ``push_skip`` (keep the input tile); a ResidualClose
adds ``skip(kept tile)`` cropped to the step's output. An op not in ``medvae.models.ops.KNOWN_OPS``
raises a TypeError naming it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medvae.models.blocks import block_ops
from medvae.models.kernels import use_optimised
from medvae.models.ops import (
    Activation,
    Conv,
    Dropout,
    NearestUpsampleConv,
    Norm,
    Op,
    ResidualClose,
    ResidualOpen,
    SelfAttention,
    check_ops,
)

Interval = tuple[int, int]  # [start, stop) along one axis, in voxels of that step's grid

POINTWISE_OPS = (Activation, Dropout, ResidualClose)


class Step:
    """A head op (or none) and the pointwise ops after it; see the module docstring."""

    def __init__(self, head: Op | None, in_channels: int, push_skip: bool):
        self.head = head
        self.trailing: list[Op] = []
        self.push_skip = push_skip
        self.in_channels = getattr(head, "in_channels", in_channels)
        self.out_channels = getattr(head, "out_channels", self.in_channels)

    @property
    def closes(self) -> int:
        """How many residual segments this step closes."""
        return sum(isinstance(op, ResidualClose) for op in self.trailing)

    def output_length(self, axis: int, n: int) -> int:
        return n

    def input_interval(self, axis: int, out: Interval, n_in: int) -> Interval:
        return out

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        """Conv flops per output voxel (elementwise work in conv-flop equivalents)."""
        flops = 10.0 * self.out_channels * len(self.trailing)
        for op in self.trailing:
            if isinstance(op, ResidualClose) and op.skip is not None:
                flops += 2.0 * skip_channels * self.out_channels
        return flops

    def finish(self, tile: torch.Tensor, held: list[tuple[torch.Tensor, list[Interval]]], out: list[Interval], fresh: bool) -> torch.Tensor:
        """Run the trailing pointwise ops on ``tile`` (covering ``out``); ResidualClose pops ``held``."""
        for op in self.trailing:
            if isinstance(op, Activation):
                tile = op.run(tile, inplace=fresh)
            elif isinstance(op, Dropout):
                tile = op.run(tile)
            else:
                block_input, have = held.pop()
                tile = op.run(tile, crop_view(block_input, have, out), inplace=fresh)
            fresh = True
        return tile

    def __repr__(self) -> str:
        ops = ([ResidualOpen()] if self.push_skip else []) + ([self.head] if self.head is not None else []) + self.trailing
        return f"{type(self).__name__}({', '.join(type(op).__name__ for op in ops)})"


class PointwiseStep(Step):
    def run_tile(self, tile, held, out):
        return self.finish(tile, held, out, fresh=False)


class NormStep(Step):
    @property
    def norm(self) -> nn.GroupNorm:
        return self.head.norm

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        return 40.0 * self.in_channels + super().flops_per_output_voxel(skip_channels)

    def run_tile(self, tile, held, out, mean, rstd):
        """Normalise with whole-volume statistics (B, groups), then the trailing ops."""
        return self.finish(self.head.run(tile, mean, rstd), held, out, fresh=True)


class WholeStep(Step):
    @property
    def module(self) -> nn.Module:
        return self.head.module

    def input_interval(self, axis: int, out: Interval, n_in: int) -> Interval:
        return 0, n_in

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        return 0.0

    def run_whole(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.head.run(x), [], [(0, n) for n in x.shape[2:]], fresh=True)


class ConvStep(Step):
    def __init__(self, head: Conv | NearestUpsampleConv, in_channels: int, push_skip: bool):
        super().__init__(head, in_channels, push_skip)
        self.upsample = isinstance(head, NearestUpsampleConv)
        self.subpixel = self.upsample and use_optimised()  # the kernel's memory footprint (planner)

    @property
    def conv(self) -> nn.Conv3d:
        return self.head.conv

    def output_length(self, axis: int, n: int) -> int:
        if self.upsample:
            return 2 * n
        k, s, p = self.conv.kernel_size[axis], self.conv.stride[axis], self.conv.padding[axis]
        return (n + 2 * p - k) // s + 1

    def _conv_input(self, axis: int, out: Interval) -> Interval:
        """Unclipped input interval for ``out``: on the coarse grid for an upsampling conv (one
        voxel of context each side, see ``kernels.upsample_conv``)."""
        if self.upsample:
            return out[0] // 2 - 1, (out[1] - 1) // 2 + 2
        k, s, p = self.conv.kernel_size[axis], self.conv.stride[axis], self.conv.padding[axis]
        return s * out[0] - p, s * (out[1] - 1) - p + k

    def input_interval(self, axis: int, out: Interval, n_in: int) -> Interval:
        start, stop = self._conv_input(axis, out)
        return max(start, 0), min(stop, n_in)

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        taps = (8 if self.subpixel else 27) if self.upsample else math.prod(self.conv.kernel_size)
        return 2.0 * self.in_channels * self.out_channels * taps + super().flops_per_output_voxel(skip_channels)

    def run_tile(self, tile, held, out, have, n_in):
        """``tile`` covers ``have`` (per axis) of this step's input of size ``n_in``; return the
        output tile ``out`` after the trailing ops."""
        want = [self._conv_input(a, out[a]) for a in range(3)]
        padded = _crop_pad(tile, have, want, n_in)
        y = self.head.run(padded, padding=0)
        if self.upsample:  # y covers fine voxels [2 a + 2, 2 b - 2) of want = [a, b)
            y = crop_view(y, [(2 * a + 2, 2 * b - 2) for a, b in want], out)
        return self.finish(y, held, out, fresh=True)


def _crop_pad(x: torch.Tensor, have: list[Interval], want: list[Interval], n: list[int]) -> torch.Tensor:
    """``x`` (covering ``have``) cut to ``want``; the parts of ``want`` outside [0, n) become zeros
    (the convolution's zero padding, which exists only at the border of the whole volume)."""
    clipped = [(max(a, 0), min(b, size)) for (a, b), size in zip(want, n)]
    x = crop_view(x, have, clipped)
    pad = []  # F.pad order: last axis first, (before, after)
    for (a, b), (ca, cb) in reversed(list(zip(want, clipped))):
        pad += [ca - a, b - cb]
    return F.pad(x, pad) if any(pad) else x


def crop_view(x: torch.Tensor, have: list[Interval], need: list[Interval]) -> torch.Tensor:
    """View of ``x`` (covering ``have``) restricted to ``need`` (inside ``have``)."""
    index = [slice(None), slice(None)]
    for (h0, h1), (n0, n1) in zip(have, need):
        assert h0 <= n0 and n1 <= h1, (have, need)
        index.append(slice(n0 - h0, n1 - h0))
    return x[tuple(index)]


_HEADS = {Norm: NormStep, Conv: ConvStep, NearestUpsampleConv: ConvStep, SelfAttention: WholeStep}


def network_steps(net: nn.Module, in_channels: int) -> list[Step]:
    """Group the op list of an Encoder or Decoder (``net.ops()``, what its forward runs) into steps."""
    where = f"tiled inference of {type(net).__name__}"
    ops = block_ops(net)
    check_ops(ops, where)
    steps: list[Step] = []
    channels = in_channels
    pending_open = 0
    for op in ops:
        if isinstance(op, ResidualOpen):
            pending_open += 1
            if pending_open > 1:  # two opens on one tensor: the first becomes a pointwise step
                steps.append(PointwiseStep(None, channels, push_skip=True))
                pending_open = 1
            continue
        kind = _HEADS.get(type(op))
        if kind is None and steps and not pending_open:
            steps[-1].trailing.append(op)
            continue
        steps.append(kind(op, channels, bool(pending_open)) if kind else PointwiseStep(None, channels, bool(pending_open)))
        if kind is None:
            steps[-1].trailing.append(op)
        pending_open = 0
        channels = steps[-1].out_channels
    if pending_open:
        raise ValueError(f"{where}: a ResidualOpen at the end of the op list is never closed")
    for before, after in zip(steps, steps[1:]):
        if before.out_channels != after.in_channels:
            raise ValueError(f"{where}: cannot follow the channels ({before} -> {after})")
    return steps
