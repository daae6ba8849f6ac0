"""The VAE objective: reconstruction + beta(step) * KL [+ adversarial], all in float32."""

from __future__ import annotations

import torch

from medvae.config import LossConfig
from medvae.losses.adversarial import generator_adversarial_loss
from medvae.losses.kl import kl_loss
from medvae.losses.reconstruction import reconstruction_loss
from medvae.losses.schedules import kl_weight_at
from medvae.models import VAEOutput


class VAELoss:
    """A plain callable holding only its config: ``total, parts = VAELoss(cfg)(output, target, step)``.

    total = rec + beta(step) * kl  [+ adversarial_weight * g_adv once ``adversarial_active(step)``]

    where rec is the voxel mean of L1/MSE/Huber (+ ssim_weight * (1 - SSIM) + gradient_weight * the L1 of
    the spatial-gradient difference), and kl is the KL per input
    voxel with free bits (see ``medvae.losses.kl``). Everything is upcast to float32 before use.
    """

    def __init__(self, cfg: LossConfig):
        if cfg.perceptual_weight > 0:
            raise ValueError(
                f"loss.perceptual_weight={cfg.perceptual_weight}: medvae has no perceptual network that "
                "works without a download; set it to 0"
            )
        self.cfg = cfg

    def adversarial_active(self, step: int) -> bool:
        """True when the generator's adversarial term is part of the loss at ``step``."""
        return self.cfg.adversarial_weight > 0 and step >= self.cfg.adversarial_start_step

    def __call__(
        self,
        output: VAEOutput,
        target: torch.Tensor,
        step: int,
        discriminator_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Total loss (scalar float32 tensor) and parts for logging.

        Args:
            output: the model's VAEOutput (reconstruction (B, C, D, H, W), mean/logvar (B, c, d, h, w)).
            target: (B, C, D, H, W) input volumes.
            step: optimizer step (0-based), drives beta and the adversarial start.
            discriminator_logits: D(reconstruction) logits (B, 1, d, h, w), needed once adversarial_active.

        parts: floats "loss", "rec", "l1", "mse" or "huber", "ssim" and "gradient_difference" (if used),
        "kl" (nats per volume), "kl_per_element", "kl_loss" (per voxel, with free bits), "kl_weighted" (beta * kl_loss),
        "beta", "g_adv" (when active), and "kl_per_channel", a detached (c,) tensor.
        """
        cfg = self.cfg
        rec, rec_parts = reconstruction_loss(
            output.reconstruction,
            target,
            kind=cfg.reconstruction,
            ssim_weight=cfg.ssim_weight,
            ssim_data_range=cfg.ssim_data_range,
            gradient_weight=cfg.gradient_weight,
            huber_delta=cfg.huber_delta,
        )
        kl, kl_parts = kl_loss(
            output.mean,
            output.logvar,
            voxels_per_volume=target[0].numel(),  # what the reconstruction mean averages over
            prior_std=cfg.prior_std,
            free_bits=cfg.free_bits,
        )
        beta = kl_weight_at(step, cfg)
        total = rec + beta * kl
        parts = {"rec": float(rec.detach()), **rec_parts, **kl_parts, "kl_loss": float(kl.detach())}
        parts["kl_weighted"] = beta * parts["kl_loss"]
        parts["beta"] = beta
        if self.adversarial_active(step):
            if discriminator_logits is None:
                raise ValueError(
                    f"VAELoss: step {step} >= loss.adversarial_start_step ({cfg.adversarial_start_step}) "
                    "with adversarial_weight > 0, but no discriminator_logits were given"
                )
            g_adv = generator_adversarial_loss(discriminator_logits, cfg.adversarial_loss)
            total = total + cfg.adversarial_weight * g_adv
            parts["g_adv"] = float(g_adv.detach())
        parts["loss"] = float(total.detach())
        return total, parts
