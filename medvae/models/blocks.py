"""Building blocks of the 3D VAE: residual block, down/upsampling, attention, and their containers.

All tensors are (B, C, D, H, W). Pure torch.nn: no files, no configs.

Every block is a ``Block``: it declares its computation as ordered ops (``medvae.models.ops``) and
its ``forward`` runs that list; a subclass may not override ``forward`` (that would make a second
description that the memory-bounded runner in ``medvae.inference`` could not follow). To change
what a block computes, change ``ops()``: one pass and the bounded runner both follow.

Kernels (``medvae.models.kernels``) are picked by capability; the speed and memory choices behind
them are measured in benchmarks/ablate_blocks.py (numbers in benchmarks/RESULTS.md):

- ``Norm, Activation, Conv`` run as one autograd node that keeps only its input and the group
  statistics for backward (``medvae.models.autograd.NormSiLUConv``): a residual block stores 2
  activation tensors instead of 6.
- Channels-last (``channels_last_3d``) end to end; on the CPU, convolutions call oneDNN directly
  where it supports the dtype; the 1x1 skip projection is a matrix product over channels.
- ``Upsample`` computes "nearest x2, then 3x3x3 conv" exactly in sub-pixel form: 8/27 of the flops
  and no upsampled tensor. The parameter is still the 3x3x3 kernel.
- The residual add is in place into the fresh convolution output.
"""

from __future__ import annotations

from torch import nn

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
    run_ops,
)


class Block(nn.Module):
    """A module whose computation is its op list: ``forward(x) = run_ops(self.ops(), x)``.

    ``checkpoint_residuals`` (instance attribute): recompute each residual segment in backward.
    """

    checkpoint_residuals = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            raise TypeError(
                f"{cls.__qualname__}: a Block's forward is its op list; declare ops() instead of overriding forward"
            )

    def ops(self) -> list[Op]:
        raise NotImplementedError(f"{type(self).__qualname__} declares no ops()")

    def forward(self, x):
        return run_ops(self.ops(), x, self.checkpoint_residuals, where=type(self).__qualname__)


def block_ops(module: nn.Module) -> list[Op]:
    """The ops of a child module: a Block's own list, nothing for nn.Identity; any other module
    raises TypeError naming it (its computation could not be followed by the bounded runner)."""
    if isinstance(module, Block):
        return module.ops()
    if type(module) is nn.Identity:
        return []
    raise TypeError(f"{type(module).__qualname__} ({module!r}) is not a medvae Block: it declares no op list")


class ResBlock(Block):
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
        self.recompute_norm = recompute_norm
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def ops(self) -> list[Op]:
        dropout = [Dropout(self.dropout)] if isinstance(self.dropout, nn.Dropout) else []
        return [
            ResidualOpen(),
            Norm(self.norm1, self.recompute_norm),
            Activation(),
            Conv(self.conv1),
            Norm(self.norm2, self.recompute_norm),
            Activation(),
            *dropout,
            Conv(self.conv2),
            ResidualClose(self.skip if isinstance(self.skip, nn.Conv3d) else None),
        ]


class Downsample(Block):
    """Strided 3x3x3 convolution: (B, C, D, H, W) -> (B, C, D/2, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def ops(self) -> list[Op]:
        return [Conv(self.conv)]


class Upsample(Block):
    """Nearest-neighbour x2 then a 3x3x3 convolution (no checkerboard from transposed convs).
    ``conv`` holds the 3x3x3 kernel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def ops(self) -> list[Op]:
        return [NearestUpsampleConv(self.conv)]


class Attention(Block):
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

    def ops(self) -> list[Op]:
        return [SelfAttention(self)]


class MidBlock(Block):
    """ResBlock, attention, ResBlock at the lowest resolution (only built when attention is on)."""

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, norm_eps: float, dropout: float, recompute_norm: bool):
        super().__init__()
        self.res_in = ResBlock(channels, channels, norm_num_groups, norm_eps, dropout, recompute_norm)
        self.attention = Attention(channels, num_heads, norm_num_groups, norm_eps)
        self.res_out = ResBlock(channels, channels, norm_num_groups, norm_eps, dropout, recompute_norm)

    def ops(self) -> list[Op]:
        return block_ops(self.res_in) + block_ops(self.attention) + block_ops(self.res_out)
