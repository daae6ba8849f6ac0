"""The KL term in float32, normalised per input voxel, with free bits.

Normalisation. The KL is summed over every latent element of a volume, averaged over the batch, and
divided by the number of input voxels per volume. The reconstruction term is a mean over voxels, so

    medvae loss = rec_mean + beta * KL_sum / N  =  (rec_sum + beta * KL_sum) / N

which is latent-diffusion's ``rec_sum + kl_weight * KL_sum`` divided by N: beta here equals LDM's
``kl_weight`` when LDM's reconstruction is summed over voxels, and beta means the same thing for a
64^3 patch and a 192^3 volume.

Free bits (Kingma et al. 2016, "Improved variational inference with inverse autoregressive flow"):
for each latent channel c the batch-averaged KL per element kl_c is replaced by max(kl_c, free_bits).
A channel under the threshold contributes exactly ``free_bits`` per element and gets no gradient from
the KL, so the encoder is free to use it; above the threshold the KL is the normal one.
"""

from __future__ import annotations

import torch

from medvae.models import DiagonalGaussian


def kl_loss(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    voxels_per_volume: int,
    prior_std: float = 1.0,
    free_bits: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """KL(q(z|x) || N(0, prior_std^2)) per input voxel, float32 whatever autocast is active.

    Args:
        mean, logvar: (B, C, d, h, w) posterior moments, any float dtype.
        voxels_per_volume: input voxels per volume, D * H * W (times input channels if you want the
            reconstruction's per-element mean to match; use whatever the reconstruction averages over).
        prior_std: std of the Gaussian prior; > 1 is a wider prior.
        free_bits: nats per latent element per channel below which the KL is not penalised.

    Returns:
        loss: scalar float32 tensor, sum_c max(kl_c, free_bits) * (d*h*w) / voxels_per_volume, where
            kl_c is channel c's KL per element averaged over the batch and the latent grid.
        parts: "kl" total KL per volume in nats (batch mean, float, no free bits), "kl_per_element"
            (float), "kl_per_channel" (C,) float32 tensor, detached, nats per element.
    """
    if voxels_per_volume < 1:
        raise ValueError(f"kl_loss: voxels_per_volume must be >= 1, got {voxels_per_volume}")
    if free_bits < 0:
        raise ValueError(f"kl_loss: free_bits must be >= 0, got {free_bits}")
    if mean.dim() < 3:
        raise ValueError(f"kl_loss: expected mean of shape (B, C, ...), got {tuple(mean.shape)}")
    with torch.autocast(device_type=mean.device.type, enabled=False):
        per_element = DiagonalGaussian(mean, logvar).kl_per_element(prior_std)  # (B, C, d, h, w) float32
        latent_elements_per_channel = per_element[0, 0].numel()  # d * h * w
        per_channel = per_element.transpose(0, 1).flatten(1).mean(dim=1)  # (C,) batch and grid mean
        penalised = per_channel.clamp(min=free_bits) if free_bits > 0 else per_channel
        loss = penalised.sum() * (latent_elements_per_channel / voxels_per_volume)
    kl_per_volume = per_channel.detach().sum() * latent_elements_per_channel
    parts = {
        "kl": float(kl_per_volume),
        "kl_per_element": float(per_channel.detach().mean()),
        "kl_per_channel": per_channel.detach(),
    }
    return loss, parts
