"""The ops a block declares, and the one executor that runs them for the model's own forward.

Every block of the network (``medvae.models.blocks``) lists its computation as ordered ops; its
``forward`` is ``run_ops(block.ops(), x)``. The memory-bounded whole-volume runner
(``medvae.inference``) walks the same list and calls the same methods of the same ops on tiles,
so the two paths cannot drift apart: there is no second description of the network.

Ops (all tensors (B, C, D, H, W)):

- ``Norm(norm)``: GroupNorm with exact statistics (``kernels.group_statistics``).
- ``Activation()``: SiLU.
- ``Conv(conv)``: a Conv3d with any kernel, stride (the strided down-sampling is a stride-2 Conv)
  and zero padding; ``float32`` runs it in float32 whatever autocast says (the output layers).
- ``NearestUpsampleConv(conv)``: nearest x2 upsampling then a 3x3x3, padding-1 Conv3d.
- ``ResidualOpen()`` / ``ResidualClose(skip)``: keep the current tensor; later add
  ``skip(kept)`` (a 1x1x1 Conv3d, or the identity when ``skip`` is None) to the current tensor.
- ``Dropout(p)``: dropout in training mode, the identity in eval mode.
- ``SelfAttention(module)``: multi-head self-attention over every voxel at once, with its
  residual; the only op that needs the whole tensor.

``run_ops`` fuses ``Norm, Activation, Conv`` into one autograd node that keeps only its input for
backward (``medvae.models.autograd.NormSiLUConv``) when gradients are on and the norm allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medvae.models import kernels


class Op:
    """One step of a block's computation. Subclasses are the closed set listed in this module."""


def compute_dtype(x: torch.Tensor, float32: bool = False) -> torch.dtype:
    """The dtype an op computes in: float32 (float64 for a float64 model) when ``float32``, else the
    autocast dtype if autocast is on for x's device, else x's dtype."""
    if float32:
        return torch.promote_types(x.dtype, torch.float32)
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _cast(module: nn.Conv3d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = None if module.bias is None else module.bias.to(dtype)
    return module.weight.to(dtype), bias


def _check_zero_padded(conv: nn.Conv3d) -> None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"ops: a Conv3d needs numeric zero padding, got {conv}")
    if tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1:
        raise ValueError(f"ops: plain convolutions only (no dilation or groups), got {conv}")


class _ConvolutionOp(Op):
    conv: nn.Conv3d

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels


@dataclass(eq=False)
class Conv(_ConvolutionOp):
    conv: nn.Conv3d
    float32: bool = False  # autocast off, float32 (the model's output convolutions)

    def __post_init__(self) -> None:
        _check_zero_padded(self.conv)

    def run(self, x: torch.Tensor, padding=None) -> torch.Tensor:
        """The convolution; ``padding`` None: the module's own (whole volume), 0: a padded tile."""
        dtype = compute_dtype(x, self.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight, bias = _cast(self.conv, dtype)
            return kernels.conv3d(x.to(dtype), weight, bias, self.conv.stride, self.conv.padding if padding is None else padding)


@dataclass(eq=False)
class NearestUpsampleConv(_ConvolutionOp):
    conv: nn.Conv3d

    def __post_init__(self) -> None:
        _check_zero_padded(self.conv)
        if tuple(self.conv.kernel_size) != (3, 3, 3) or tuple(self.conv.stride) != (1, 1, 1) or tuple(self.conv.padding) != (1, 1, 1):
            raise ValueError(f"NearestUpsampleConv needs a 3x3x3, stride 1, padding 1 conv, got {self.conv}")

    def run(self, x: torch.Tensor, padding: int = 1) -> torch.Tensor:
        """(B, C, n, n, n) -> (B, C_out, 2n, 2n, 2n); ``padding=0``: see ``kernels.upsample_conv``."""
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight, bias = _cast(self.conv, dtype)
            return kernels.upsample_conv(x.to(dtype), weight, bias, padding)


@dataclass(eq=False)
class Norm(Op):
    norm: nn.GroupNorm
    recompute: bool = True  # may fuse with a following Activation, Conv (saves two tensors in training)

    @property
    def in_channels(self) -> int:
        return self.norm.num_channels

    out_channels = in_channels

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, rstd) of the whole of ``x``, each (B, groups)."""
        return kernels.group_statistics(x, self.norm.num_groups, self.norm.eps)

    def run(self, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        """GroupNorm of ``x`` (the whole volume or a tile of it) with the given statistics."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return kernels.normalize(x, mean, rstd, self.norm.weight, self.norm.bias)


@dataclass(eq=False)
class Activation(Op):
    def run(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        return F.silu(x, inplace=inplace)


@dataclass(eq=False)
class Dropout(Op):
    module: nn.Dropout

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@dataclass(eq=False)
class ResidualOpen(Op):
    pass


@dataclass(eq=False)
class ResidualClose(Op):
    skip: nn.Conv3d | None = None  # 1x1x1 projection when the channels change; None: identity

    def run(self, h: torch.Tensor, block_input: torch.Tensor, inplace: bool) -> torch.Tensor:
        """h + skip(block_input); ``block_input`` covers the same voxels as ``h``."""
        if self.skip is not None:
            dtype = compute_dtype(block_input)
            with torch.autocast(device_type=block_input.device.type, enabled=False):
                weight, bias = _cast(self.skip, dtype)
                block_input = kernels.pointwise_conv(block_input.to(dtype), weight, bias)
        block_input = block_input.to(h.dtype)
        return h.add_(block_input) if inplace else h + block_input


@dataclass(eq=False)
class SelfAttention(Op):
    module: nn.Module  # blocks.Attention: norm, qkv, proj, num_heads

    @property
    def in_channels(self) -> int:
        return self.module.norm.num_channels

    out_channels = in_channels

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """x + proj(attention(qkv(norm(x)))) over all d * h * w voxels of x."""
        m = self.module
        b, c, d, h, w = x.shape
        normed = Norm(m.norm).run(x, *Norm(m.norm).statistics(x))
        qkv = F.conv3d(normed, m.qkv.weight, m.qkv.bias).reshape(b, 3, m.num_heads, c // m.num_heads, d * h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, d, h, w)
        return x + F.conv3d(out, m.proj.weight, m.proj.bias)


KNOWN_OPS = (Conv, NearestUpsampleConv, Norm, Activation, Dropout, ResidualOpen, ResidualClose, SelfAttention)


def check_ops(ops: list[Op], where: str) -> None:
    """Raise TypeError naming the first op that is not one of ``KNOWN_OPS`` (by exact type)."""
    for op in ops:
        if type(op) not in KNOWN_OPS:
            raise TypeError(f"{where}: unknown op {op!r} ({type(op).__qualname__}); known ops: "
                            f"{', '.join(k.__name__ for k in KNOWN_OPS)}")


def matching_close(ops: list[Op], start: int) -> int:
    """Index of the ResidualClose that closes the ResidualOpen at ``start``."""
    depth = 0
    for i in range(start, len(ops)):
        depth += isinstance(ops[i], ResidualOpen) - isinstance(ops[i], ResidualClose)
        if depth == 0:
            return i
    raise ValueError(f"ops: ResidualOpen at {start} is never closed")


def _fusable(ops: list[Op], i: int) -> bool:
    """Norm, Activation, Conv at ``i`` and fusing them is allowed now."""
    return (
        i + 2 < len(ops)
        and type(ops[i]) is Norm
        and type(ops[i + 1]) is Activation
        and type(ops[i + 2]) is Conv
        and ops[i].recompute
        and torch.is_grad_enabled()
        and kernels.use_optimised()
    )


def _norm_silu_conv(norm: Norm, conv: Conv, x: torch.Tensor) -> torch.Tensor:
    from medvae.models.autograd import NormSiLUConv

    n, c = norm.norm, conv.conv
    dtype = compute_dtype(x, conv.float32)
    return NormSiLUConv.apply(x, n.weight, n.bias, c.weight, c.bias, n.num_groups, n.eps, tuple(c.stride), tuple(c.padding), dtype)


def run_ops(ops: list[Op], x: torch.Tensor, checkpoint_residuals: bool = False, where: str = "forward") -> torch.Tensor:
    """Run ``ops`` on the whole tensor ``x`` (B, C, D, H, W).

    ``checkpoint_residuals``: under autograd, each outermost residual segment (ResidualOpen ..
    ResidualClose) keeps only its input and is recomputed in backward. An op outside ``KNOWN_OPS``
    raises TypeError naming it.
    """
    check_ops(ops, where)
    held: list[torch.Tensor] = []
    fresh = False  # x is a tensor this call made and nothing else holds: in-place ops are safe
    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, ResidualOpen) and checkpoint_residuals and torch.is_grad_enabled() and x.requires_grad:
            stop = matching_close(ops, i) + 1
            x = checkpoint(run_ops, ops[i:stop], x, False, where, use_reentrant=False)
            i, fresh = stop, True
            continue
        if _fusable(ops, i):
            x, i, fresh = _norm_silu_conv(op, ops[i + 2], x), i + 3, True
            continue
        if isinstance(op, ResidualOpen):
            held.append(x)
            fresh = False
        elif isinstance(op, ResidualClose):
            x = op.run(x, held.pop(), inplace=fresh)
            fresh = True
        elif isinstance(op, Norm):
            x, fresh = op.run(x, *op.statistics(x)), True
        elif isinstance(op, Activation):
            x = op.run(x, inplace=fresh and not torch.is_grad_enabled())
        elif isinstance(op, Dropout):
            x, fresh = op.run(x), fresh and not op.module.training
        else:  # Conv, NearestUpsampleConv, SelfAttention
            x, fresh = op.run(x), True
        i += 1
    if held:
        raise ValueError(f"{where}: {len(held)} ResidualOpen op(s) never closed")
    return x
