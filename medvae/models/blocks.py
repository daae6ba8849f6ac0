"""Building blocks of the 3D VAE: norm+activation, residual block, down/upsampling, attention.

All tensors are (B, C, D, H, W). Pure torch.nn: no files, no configs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # fp16 activations can hold values whose squares overflow; normalise those in float32.
    # bf16 has float32's exponent range and CPU kernels accumulate its statistics in float32.
    if x.dtype == torch.float16:
        y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
        return F.silu(y).to(torch.float16)
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm followed by SiLU.

    With ``recompute=True`` the normalised and activated tensors are not kept for backward: only the
    input is, and the two cheap elementwise passes are redone in backward. That removes two full
    activation tensors per block from training memory for a small cost in time.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, recompute: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(_group_norm_silu, x, self.num_groups, self.weight, self.bias, self.eps, use_reentrant=False)
        return _group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), with a 1x1 projection when channels change.

    The second convolution starts at zero, so every block is the identity at initialisation and the
    network's output scale does not grow with depth.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        recompute_norm: bool = True,
    ):
        super().__init__()
        self.norm1 = GroupNormSiLU(norm_num_groups, in_channels, norm_eps, recompute_norm)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormSiLU(norm_num_groups, out_channels, norm_eps, recompute_norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3x3 convolution: (B, C, D, H, W) -> (B, C, D/2, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3x3 convolution (no checkerboard from transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head self-attention over all voxels of the lowest-resolution grid, with a residual."""

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, norm_eps: float = 1e-6):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, d * h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, d, h, w)
        return x + self.proj(out)


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (only built when attention is on)."""

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, norm_eps: float, dropout: float, recompute_norm: bool):
        super().__init__()
        self.res_in = ResBlock(channels, channels, norm_num_groups, norm_eps, dropout, recompute_norm)
        self.attention = Attention(channels, num_heads, norm_num_groups, norm_eps)
        self.res_out = ResBlock(channels, channels, norm_num_groups, norm_eps, dropout, recompute_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_out(self.attention(self.res_in(x)))


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run ``block``; under activation checkpointing keep only its input for backward."""
    if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(block, x, use_reentrant=False)
    return block(x)
