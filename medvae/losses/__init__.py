"""Loss terms, all computed in float32: reconstruction, KL with free bits, beta schedules, adversarial.

The VAE terms return ``(loss, parts)``: a scalar tensor to backpropagate and floats to log; the
adversarial terms return the scalar alone.
"""

from medvae.losses.adversarial import discriminator_loss, generator_adversarial_loss
from medvae.losses.kl import kl_loss
from medvae.losses.reconstruction import reconstruction_loss, ssim_loss
from medvae.losses.schedules import kl_weight_at
from medvae.losses.vae_loss import VAELoss

__all__ = [
    "VAELoss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "kl_loss",
    "kl_weight_at",
    "reconstruction_loss",
    "ssim_loss",
]
