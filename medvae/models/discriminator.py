"""A 3D PatchGAN discriminator: one real/fake logit per overlapping patch of the volume.

The pix2pix layout (Isola et al. 2017) in 3D: ``num_layers`` stride-2 4^3 convolutions, one
stride-1 convolution, and a 1-channel stride-1 output convolution. Pure torch.nn.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("group", "none")


class PatchDiscriminator3D(nn.Module):
    """Patch logits (B, 1, d, h, w) for volumes (B, in_channels, D, H, W).

    Args:
        in_channels: input channels.
        channels: width of the first layer; doubles per layer up to 8x.
        num_layers: stride-2 layers; each side of the input must be >= 3 * 2**num_layers voxels.
            Output side = floor(side / 2**num_layers) - 2.
        norm: "group" (GroupNorm after every conv except the first and the last) or "none".
        norm_num_groups: groups of that GroupNorm (must divide every width).
        spectral_norm: wrap every convolution in spectral normalisation (Miyato et al. 2018).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        num_layers: int = 3,
        norm: str = "group",
        norm_num_groups: int = 8,
        spectral_norm: bool = False,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"PatchDiscriminator3D: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if num_layers < 1 or channels < 1 or in_channels < 1:
            raise ValueError(
                f"PatchDiscriminator3D: need in_channels, channels, num_layers >= 1, "
                f"got {in_channels}, {channels}, {num_layers}"
            )
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        if norm == "group" and any(w % norm_num_groups for w in widths[1:]):
            raise ValueError(f"PatchDiscriminator3D: norm_num_groups {norm_num_groups} does not divide widths {widths[1:]}")
        self.num_layers = num_layers

        def conv(cin: int, cout: int, stride: int) -> nn.Module:
            layer = nn.Conv3d(cin, cout, kernel_size=4, stride=stride, padding=1)
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        def norm_act(width: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.GroupNorm(norm_num_groups, width)] if norm == "group" else []
            return layers + [nn.LeakyReLU(0.2)]

        # first layer: no normalisation, as in pix2pix
        layers: list[nn.Module] = [conv(in_channels, widths[0], 2), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers):
            layers += [conv(widths[i - 1], widths[i], 2), *norm_act(widths[i])]
        layers += [conv(widths[num_layers - 1], widths[num_layers], 1), *norm_act(widths[num_layers])]
        layers += [conv(widths[num_layers], 1, 1)]
        self.layers = nn.Sequential(*layers)

    @property
    def min_input_size(self) -> int:
        """Smallest side (voxels) that still gives one patch logit."""
        return 3 * 2**self.num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) -> logits (B, 1, d, h, w)."""
        if x.dim() != 5:
            raise ValueError(f"PatchDiscriminator3D: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(
                f"PatchDiscriminator3D: input sides {tuple(x.shape[2:])} are smaller than "
                f"{self.min_input_size} voxels (3 * 2**num_layers); use fewer layers"
            )
        return self.layers(x)
