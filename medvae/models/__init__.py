"""Pure torch.nn models: no files, configs, Accelerate or wandb in here."""

from medvae.models.posterior import DiagonalGaussian
from medvae.models.vae import VAE3D, VAE3DArchitecture, VAEOutput

__all__ = ["DiagonalGaussian", "VAE3D", "VAE3DArchitecture", "VAEOutput"]
