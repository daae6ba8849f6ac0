"""The encoder and decoder as a flat list of steps that can each run on one tile of a volume.

A step maps the whole-volume tensor T_i to T_{i+1}. Every step knows (per spatial axis) which input
interval one output interval needs, so a tile of T_{i+1} can be computed exactly from a tile of T_i:

- ``ConvStep``: a Conv3d (any kernel, stride, zero padding), optionally after nearest x2
  upsampling. The zero padding of the whole volume is re-created at the volume border only, so a
  tile's result equals the same voxels of the one-pass result.
- ``NormStep``: GroupNorm (+ SiLU) with statistics of the WHOLE volume, set by the caller
  (``medvae.inference.statistics``). A residual block starts at its first NormStep (``push_skip``)
  and ends at its last ConvStep (``skip``), which adds ``skip(block input)``.
- ``WholeStep``: any other module (attention at the lowest resolution) runs on the whole tensor.

The list is built from module types (ResBlock, Downsample, Upsample, GroupNorm, Conv3d, MidBlock),
so it follows the model's structure rather than parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvae.models.blocks import Downsample, GroupNormSiLU, MidBlock, ResBlock, Upsample, channels_last
from medvae.models.capability import onednn_convolution_ok
from medvae.models.vae import DecoderLevel, EncoderLevel

Interval = tuple[int, int]  # [start, stop) along one axis, in voxels of that step's grid


# Nearest x2 upsampling then a 3-tap convolution equals a stride-2 transposed convolution with 4 taps
# whose weights are sums of the 3 taps: along one axis [w2, w1 + w2, w0 + w1, w0]. Fine voxel 2c
# sees coarse c - 1 (w0) and c (w1 + w2); fine voxel 2c + 1 sees c (w0 + w1) and c + 1 (w2). The zero
# padding of the fine grid is the zero padding of the coarse one. 8 instead of 27 taps per output.
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


@dataclass
class ConvStep:
    conv: nn.Conv3d
    upsample: bool = False  # nearest x2 before the convolution (Upsample)
    float32: bool = False  # run with autocast off on a float32 input (the model's output convs)
    skip: nn.Module | None = None  # closes a residual block: output += skip(block input)
    onednn: bool = False  # a channels-last model: CPU convolutions go straight to oneDNN

    def __post_init__(self) -> None:
        if self.conv.padding_mode != "zeros" or isinstance(self.conv.padding, str):
            raise ValueError(f"tiled inference needs numeric zero padding, got {self.conv}")
        if tuple(self.conv.dilation) != (1, 1, 1) or self.conv.groups != 1:
            raise ValueError(f"tiled inference supports plain convolutions only, got {self.conv}")
        geometry = (tuple(self.conv.kernel_size), tuple(self.conv.stride), tuple(self.conv.padding))
        self.transposed = self.upsample and geometry == ((3, 3, 3), (1, 1, 1), (1, 1, 1))
        self._transposed_weight: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def output_length(self, axis: int, n: int) -> int:
        k, s, p = self.conv.kernel_size[axis], self.conv.stride[axis], self.conv.padding[axis]
        n = 2 * n if self.upsample else n
        return (n + 2 * p - k) // s + 1

    def _conv_input(self, axis: int, out: Interval) -> Interval:
        """Unclipped interval of the convolution's input grid (after upsampling) for ``out``."""
        k, s, p = self.conv.kernel_size[axis], self.conv.stride[axis], self.conv.padding[axis]
        return s * out[0] - p, s * (out[1] - 1) - p + k

    def input_interval(self, axis: int, out: Interval, n_in: int) -> Interval:
        start, stop = self._conv_input(axis, out)
        if self.upsample:
            start, stop = max(start, 0), min(stop, 2 * n_in)
            return start // 2, (stop + 1) // 2
        return max(start, 0), min(stop, n_in)

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        taps = 8 if self.transposed else math.prod(self.conv.kernel_size)
        flops = 2.0 * self.in_channels * self.out_channels * taps
        if isinstance(self.skip, nn.Conv3d):
            flops += 2.0 * skip_channels * self.out_channels
        return flops

    def forward(self, x: torch.Tensor, have: list[Interval], out: list[Interval], n_in: list[int]) -> torch.Tensor:
        """``x`` covers ``have`` (per axis) of this step's input; return the output tile ``out``."""
        if self.transposed:
            # coarse voxels (o0 - 1) // 2 .. o1 // 2 feed fine voxels o0 .. o1 - 1
            want = [((o0 - 1) // 2, o1 // 2 + 1) for o0, o1 in out]
            y = _convolve(_crop_pad(x, have, want, n_in), self._weight_transposed(), self.conv.bias, (2, 2, 2), transposed=True)
            return crop_view(y, [(2 * a, 2 * b) for a, b in want], out)  # y[j] is fine voxel 2 * want[0] + j
        if self.upsample:
            need = [self.input_interval(a, out[a], n_in[a]) for a in range(3)]
            x = F.interpolate(crop_view(x, have, need), scale_factor=2.0, mode="nearest")
            have = [(2 * a, 2 * b) for a, b in need]
            n_in = [2 * n for n in n_in]
        x = _crop_pad(x, have, [self._conv_input(a, out[a]) for a in range(3)], n_in)
        return _convolve(x, self.conv.weight, self.conv.bias, self.conv.stride, float32=self.float32, onednn=self.onednn)

    def add_skip(self, h: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
        """h += skip(block_input), in place; ``block_input`` is cropped to h's voxels already."""
        if isinstance(self.skip, nn.Conv3d):
            return h.add_(_convolve(block_input, self.skip.weight, self.skip.bias, self.skip.stride, onednn=self.onednn))
        return h.add_(block_input)

    def _weight_transposed(self) -> torch.Tensor:
        """(in, out, 4, 4, 4) weight of the transposed convolution, summed in float64."""
        if self._transposed_weight is None:
            w = self.conv.weight
            taps = torch.tensor(_UPSAMPLE_TAPS, dtype=torch.float64, device=w.device)
            summed = torch.einsum("oidhw,ad,bh,cw->ioabc", w.double(), taps, taps, taps)
            self._transposed_weight = summed.to(w.dtype).contiguous(memory_format=torch.channels_last_3d)
        return self._transposed_weight


@dataclass
class NormStep:
    norm: nn.GroupNorm
    silu: bool
    push_skip: bool = False  # first step of a residual block: keep the input tile for the skip

    @property
    def in_channels(self) -> int:
        return self.norm.num_channels

    out_channels = in_channels

    def output_length(self, axis: int, n: int) -> int:
        return n

    def input_interval(self, axis: int, out: Interval, n_in: int) -> Interval:
        return out

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        return 40.0 * self.in_channels  # memory-bound elementwise work, in conv-flop equivalents

    def forward(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        """Normalise with whole-volume statistics ``mean``, ``rstd`` of shape (B, groups) (float32,
        float64 for a float64 model); the result has x's dtype."""
        b, c = x.shape[:2]
        per_group = c // self.norm.num_groups
        mean_c = mean.repeat_interleave(per_group, dim=1).view(b, c, 1, 1, 1)
        scale_c = rstd.repeat_interleave(per_group, dim=1)
        if self.norm.affine:
            scale_c = scale_c * self.norm.weight
        y = torch.sub(x.to(_at_least_float32(x.dtype)), mean_c)  # float32 like the model's group norm
        y.mul_(scale_c.view(b, c, 1, 1, 1))
        if self.norm.affine:
            y.add_(self.norm.bias.view(1, c, 1, 1, 1))
        if self.silu:
            F.silu(y, inplace=True)
        return y.to(x.dtype)


@dataclass
class WholeStep:
    module: nn.Module
    channels: int

    @property
    def in_channels(self) -> int:
        return self.channels

    out_channels = in_channels

    def output_length(self, axis: int, n: int) -> int:
        return n

    def input_interval(self, axis: int, out: Interval, n_in: int) -> Interval:
        return 0, n_in

    def flops_per_output_voxel(self, skip_channels: int) -> float:
        return 0.0


Step = ConvStep | NormStep | WholeStep




def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else ``dtype`` (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _convolve(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, *,
    transposed: bool = False, float32: bool = False, onednn: bool = False,
) -> torch.Tensor:
    """A convolution of an already zero-padded tile (padding 0; a transposed one with padding 1),
    in the autocast dtype if autocast is on, else in float32 when ``float32``, else in x's dtype.

    ``float32`` means float32 or wider: a float64 model stays float64 throughout.
    ``onednn`` (channels-last models on the CPU): float32/bf16 convolutions go straight to oneDNN;
    PyTorch would send small or 1-channel float32 tiles to an im2col kernel that is slower,
    allocates a column buffer of C_in x 27 x the output and returns contiguous output.
    """
    device = x.device.type
    if float32:
        dtype = _at_least_float32(x.dtype)
    else:
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device_type=device, enabled=False):
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if transposed:
            return F.conv_transpose3d(x, weight, bias, stride=stride, padding=1)
        if onednn and device == "cpu" and onednn_convolution_ok(dtype):
            x, weight = channels_last(x), channels_last(weight)
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, [0, 0, 0], list(stride), [1, 1, 1], 1)
        return F.conv3d(x, weight, bias, stride)


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


def _norm_step(module: nn.GroupNorm, push_skip: bool = False) -> NormStep:
    return NormStep(module, silu=isinstance(module, GroupNormSiLU), push_skip=push_skip)


def _res_block_steps(block: ResBlock) -> list[Step]:
    if not isinstance(block.dropout, (nn.Identity, nn.Dropout)):
        raise ValueError(f"tiled inference: unexpected dropout module {block.dropout}")
    return [
        _norm_step(block.norm1, push_skip=True),
        ConvStep(block.conv1),
        _norm_step(block.norm2),
        ConvStep(block.conv2, skip=block.skip),  # dropout is the identity in eval mode
    ]


def _module_steps(module: nn.Module | None, channels: int) -> list[Step]:
    """Steps for one child of an encoder or decoder, dispatched on its type."""
    if module is None or isinstance(module, (nn.Identity, nn.Dropout)):
        return []
    if isinstance(module, ResBlock):
        return _res_block_steps(module)
    if isinstance(module, Downsample):
        return [ConvStep(module.conv)]
    if isinstance(module, Upsample):
        return [ConvStep(module.conv, upsample=True)]
    if isinstance(module, nn.GroupNorm):
        return [_norm_step(module)]
    if isinstance(module, nn.Conv3d):
        return [ConvStep(module)]
    if isinstance(module, MidBlock):
        steps: list[Step] = []
        for child in module.children():  # res_in, attention, res_out, in forward order
            steps += _module_steps(child, channels)
        return steps
    if isinstance(module, (nn.ModuleList, nn.Sequential, EncoderLevel, DecoderLevel)):
        steps = []
        for child in module.children():
            steps += _module_steps(child, channels)
            channels = steps[-1].out_channels if steps else channels
        return steps
    # Anything else (self-attention) sees every voxel at once: run it whole.
    return [WholeStep(module, channels)]


def network_steps(net: nn.Module, in_channels: int, channels_last_layout: bool = False) -> list[Step]:
    """Flatten an Encoder or Decoder (children in registration order = forward order) into steps.

    The last convolution (``conv_out``) runs in float32 with autocast off, as the model does.
    """
    steps: list[Step] = []
    channels = in_channels
    for child in net.children():
        steps += _module_steps(child, channels)
        channels = steps[-1].out_channels if steps else channels
    if not steps or not isinstance(steps[-1], ConvStep):
        raise ValueError(f"tiled inference: {type(net).__name__} does not end in a convolution")
    steps[-1].float32 = True
    for step in steps:
        if isinstance(step, ConvStep):
            step.onednn = channels_last_layout
    for before, after in zip(steps, steps[1:]):
        if before.out_channels != after.in_channels:
            raise ValueError(f"tiled inference: cannot follow the channels of {type(net).__name__} ({before} -> {after})")
    return steps
