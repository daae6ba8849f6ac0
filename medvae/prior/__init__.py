"""Latent priors: what ``medvae generate`` samples before the decoder turns latents into scans.

- ``gaussian``: the fitted Gaussian over the latent grid (low-rank + diagonal), fitted after VAE
  training and stored inside the VAE export (``generate --prior fitted``).
- ``latents``: the training set encoded once into posterior means, cached as safetensors with its
  provenance (model hash, preprocessing) and the latent scale factor.
- ``diffusion``: a latent diffusion prior (MONAI ``DiffusionModelUNet`` and schedulers) trained by
  ``medvae train-prior`` and sampled by ``generate --prior diffusion``.
- ``quality``: sample measures that need no download (Fréchet distance and MMD on pooled latent
  means, intensity-histogram and foreground distances in real units, the copy check).

The fitted prior's names are re-exported here, so ``from medvae.prior import fit_prior`` keeps working.
"""

from medvae.prior.gaussian import (
    PRIOR_NAME,
    LatentPrior,
    common_latent_shape,
    crop_or_pad,
    evenly_spaced,
    fit_and_save_prior,
    fit_prior,
    fit_prior_to_volumes,
    load_prior,
    save_prior,
)

__all__ = [
    "PRIOR_NAME",
    "LatentPrior",
    "common_latent_shape",
    "crop_or_pad",
    "evenly_spaced",
    "fit_and_save_prior",
    "fit_prior",
    "fit_prior_to_volumes",
    "load_prior",
    "save_prior",
]
