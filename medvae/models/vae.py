"""The 3D convolutional VAE: encoder, decoder and the model that joins them.

Shapes: input (B, in_channels, D, H, W) with D, H, W divisible by ``downsampling_factor``
(2 ** (len(channels) - 1)); latent (B, latent_channels, D/f, H/f, W/f).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from medvae.models.architecture import VAE3DArchitecture
from medvae.models.blocks import Block, Downsample, MidBlock, ResBlock, Upsample, block_ops
from medvae.models.kernels import channels_last
from medvae.models.ops import Activation, Conv, Norm, Op
from medvae.models.posterior import DiagonalGaussian
from medvae.models.shortcut import add_decoded_latent, add_encoded_input

# The moments convolution starts at 1% of its default scale: mean ~ 0 and logvar ~ 0 (or
# ``logvar_init``), so the learned part of the posterior starts at the prior (or at a fixed narrower
# std) and its initial KL is near zero (at most 0.5 (exp(l) - 1 - l) per element for logvar_init l)
# whatever the input scale; the shortcut's block code, bounded, is added to the mean on top of it.
MOMENTS_INIT_SCALE = 0.01


class VAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, out_channels, D, H, W)
    mean: torch.Tensor  # (B, latent_channels, d, h, w), float32
    logvar: torch.Tensor  # (B, latent_channels, d, h, w), float32


class EncoderLevel(Block):
    """Residual blocks at one resolution, then a stride-2 downsampling (except at the last level)."""

    def __init__(self, in_ch: int, out_ch: int, arch: VAE3DArchitecture, downsample: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, arch.norm_num_groups, arch.norm_eps, arch.dropout, arch.recompute_norm)
            for i in range(arch.num_res_blocks)
        )
        self.downsample = Downsample(out_ch) if downsample else nn.Identity()

    def ops(self) -> list[Op]:
        return [op for block in self.res_blocks for op in block_ops(block)] + block_ops(self.downsample)


class DecoderLevel(Block):
    """Residual blocks at one resolution, then a x2 upsampling (except at the last level)."""

    def __init__(self, in_ch: int, out_ch: int, arch: VAE3DArchitecture, upsample: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, arch.norm_num_groups, arch.norm_eps, arch.dropout, arch.recompute_norm)
            for i in range(arch.num_res_blocks)
        )
        self.upsample = Upsample(out_ch) if upsample else nn.Identity()

    def ops(self) -> list[Op]:
        return [op for block in self.res_blocks for op in block_ops(block)] + block_ops(self.upsample)


class Encoder(Block):
    """(B, in_channels, D, H, W) -> moments (B, 2 * latent_channels, D/f, H/f, W/f) in float32."""

    def __init__(self, arch: VAE3DArchitecture):
        super().__init__()
        self.arch = arch
        self.checkpoint_residuals = arch.gradient_checkpointing
        ch = arch.channels
        self.conv_in = nn.Conv3d(arch.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            EncoderLevel(ch[max(i - 1, 0)], ch[i], arch, downsample=i < len(ch) - 1) for i in range(len(ch))
        )
        self.mid = (
            MidBlock(ch[-1], arch.attention_heads, arch.norm_num_groups, arch.norm_eps, arch.dropout, arch.recompute_norm)
            if arch.attention
            else None
        )
        self.norm_out = nn.GroupNorm(arch.norm_num_groups, ch[-1], eps=arch.norm_eps)
        self.conv_out = nn.Conv3d(ch[-1], 2 * arch.latent_channels, 3, padding=1)
        with torch.no_grad():
            self.conv_out.weight.mul_(MOMENTS_INIT_SCALE)
            self.conv_out.bias.zero_()
            self.conv_out.bias[arch.latent_channels:].fill_(arch.logvar_init)

    def ops(self) -> list[Op]:
        mid = block_ops(self.mid) if self.mid is not None else []
        levels = [op for level in self.levels for op in block_ops(level)]
        # The moments are the numbers the KL sees: the last convolution runs in float32 even under autocast.
        head = [Norm(self.norm_out, self.arch.recompute_norm), Activation(), Conv(self.conv_out, float32=True)]
        return [Conv(self.conv_in), *levels, *mid, *head]


class Decoder(Block):
    """(B, latent_channels, d, h, w) -> (B, out_channels, d*f, h*f, w*f); output conv in float32."""

    def __init__(self, arch: VAE3DArchitecture):
        super().__init__()
        self.arch = arch
        self.checkpoint_residuals = arch.gradient_checkpointing
        ch = tuple(reversed(arch.channels))
        self.conv_in = nn.Conv3d(arch.latent_channels, ch[0], 3, padding=1)
        self.mid = (
            MidBlock(ch[0], arch.attention_heads, arch.norm_num_groups, arch.norm_eps, arch.dropout, arch.recompute_norm)
            if arch.attention
            else None
        )
        self.levels = nn.ModuleList(
            DecoderLevel(ch[max(i - 1, 0)], ch[i], arch, upsample=i < len(ch) - 1) for i in range(len(ch))
        )
        self.norm_out = nn.GroupNorm(arch.norm_num_groups, ch[-1], eps=arch.norm_eps)
        self.conv_out = nn.Conv3d(ch[-1], arch.out_channels or arch.in_channels, 3, padding=1)

    def ops(self) -> list[Op]:
        mid = block_ops(self.mid) if self.mid is not None else []
        levels = [op for level in self.levels for op in block_ops(level)]
        # Output voxels in float32: an fp16 output layer can overflow on unnormalised intensities.
        head = [Norm(self.norm_out, self.arch.recompute_norm), Activation(), Conv(self.conv_out, float32=True)]
        return [Conv(self.conv_in), *mid, *levels, *head]


class VAE3D(nn.Module):
    """3D convolutional VAE.

    ``model(x)`` -> ``VAEOutput(reconstruction, mean, logvar)`` (sampling z in training mode, the
    posterior mean in eval mode unless ``sample_posterior`` says otherwise; in training mode the
    decoder's latent also gets ``latent_noise``);
    ``model.encode(x)`` -> ``DiagonalGaussian``; ``model.decode(z)`` -> voxels. With ``shortcut``
    (``"dct"`` by default), encode adds a fixed code of the input's f^3 blocks to the posterior mean
    and decode adds the blocks the latent's code stands for to the voxels (``medvae.models.shortcut``).
    Keyword arguments are the fields of ``VAE3DArchitecture``.
    """

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.arch = VAE3DArchitecture(**kwargs)
        self.encoder = Encoder(self.arch)
        self.decoder = Decoder(self.arch)
        if self.arch.channels_last:
            self.to(memory_format=torch.channels_last_3d)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VAE3D":
        return cls(**VAE3DArchitecture.from_dict(config).to_dict())

    @property
    def config(self) -> dict[str, Any]:
        return self.arch.to_dict()

    @property
    def downsampling_factor(self) -> int:
        return self.arch.downsampling_factor

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected a 5-D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.arch.in_channels:
            raise ValueError(f"expected {self.arch.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        f = self.downsampling_factor
        bad = [s for s in x.shape[2:] if s % f]
        if bad:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by the downsampling factor {f}; "
                f"pad or crop each of D, H, W to a multiple of {f}"
            )
        if self.arch.channels_last:
            x = channels_last(x)
        return x

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, C, D, H, W) voxels -> posterior over (B, latent_channels, D/f, H/f, W/f)."""
        x = self._check_input(x)
        return self.posterior(self.encoder(x), x)

    def posterior(self, moments: torch.Tensor, x: torch.Tensor, inplace: bool = False) -> DiagonalGaussian:
        """The posterior from the encoder's moments (B, 2 * latent_channels, d, h, w) and its input x:
        with ``shortcut``, the code of x's blocks joins the mean (``inplace``: into ``moments``, a fresh
        tensor under no_grad). Whole-volume inference calls this too."""
        mean, logvar = moments.chunk(2, dim=1)
        if self.arch.shortcut != "none":  # a name from SHORTCUTS: VAE3DArchitecture normalises it
            mean = add_encoded_input(mean, x, self.arch.shortcut, self.downsampling_factor, inplace=inplace)
        return DiagonalGaussian(mean, logvar)

    def output(self, voxels: torch.Tensor, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The decoded voxels from the decoder's output and its latent z: with ``shortcut``, the blocks
        z's code decodes to join them (``inplace`` for a fresh tensor under no_grad). Whole-volume
        inference calls this too."""
        if self.arch.shortcut != "none":
            voxels = add_decoded_latent(voxels, z, self.arch.shortcut, self.downsampling_factor, inplace=inplace)
        return voxels

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, d, h, w) latent -> (B, out_channels, d*f, h*f, w*f) voxels."""
        if z.ndim != 5 or z.shape[1] != self.arch.latent_channels:
            raise ValueError(f"expected a latent (B, {self.arch.latent_channels}, d, h, w), got shape {tuple(z.shape)}")
        if self.arch.channels_last:
            z = channels_last(z)
        return self.output(self.decoder(z), z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool | None = None, generator: torch.Generator | None = None
    ) -> VAEOutput:
        posterior = self.encode(x)
        if sample_posterior is None:
            sample_posterior = self.training
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        if self.training and self.arch.latent_noise > 0:
            z = z + self.arch.latent_noise * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return VAEOutput(self.decode(z), posterior.mean, posterior.logvar)
