"""The VAE as a training task: VAE3D, the volume datasets, the VAE loss with its optional
discriminator, whole-volume validation, and the export with its fitted latent prior."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medvae.atomic import atomic_file
from medvae.config import Config, to_dict
from medvae.export import save_model
from medvae.losses import VAELoss
from medvae.losses.adversarial import discriminator_loss
from medvae.models import VAE3D
from medvae.models.architecture import VAE3DArchitecture
from medvae.models.discriminator import PatchDiscriminator3D
from medvae.train.task import TrainingTask

# Architecture fields that change how the model is initialised, trains or runs, not what its
# weights compute: free to change on resume (dropout and latent noise are off at inference).
RUN_ONLY_FIELDS = ("gradient_checkpointing", "recompute_norm", "channels_last", "dropout", "logvar_init",
                   "latent_noise")


class VAETask(TrainingTask):
    """Train a ``VAE3D`` as ``config`` says (``config.model``, ``config.data``, ``config.loss``)."""

    name = "vae"
    primary_term = "reconstruction"

    def __init__(self, config: Config):
        self.config = config
        self.batch_size = config.data.batch_size  # volumes per micro-batch, per process
        self.samples_per_item = config.data.crops_per_volume  # crops per volume: the micro-batch's real size
        self.num_workers = config.data.num_workers
        self.loss_fn = VAELoss(config.loss)
        self.downsampling_factor: int | None = None
        self.train_set = self.val_set = None
        self.preprocessing: dict | None = None
        self.precision = None
        self.discriminator = self.disc_optimizer = None
        self._last = None  # (input, reconstruction) of the last micro-batch, for the discriminator

    def build_model(self) -> VAE3D:
        model = VAE3D(**to_dict(self.config)["model"])
        self.downsampling_factor = model.downsampling_factor
        return model

    def model_signature(self, config: dict) -> dict:
        """The architecture, without the fields that only change how it runs. A config recorded before
        ``model.shortcut`` existed trained without one."""
        model = {"shortcut": False, **(config.get("model") or {})}
        known = {k: v for k, v in model.items() if k in VAE3DArchitecture.__dataclass_fields__}
        arch = VAE3DArchitecture.from_dict(known).to_dict()
        return {k: v for k, v in arch.items() if k not in RUN_ONLY_FIELDS}

    def build_data(self, run_dir: Path):
        from medvae.data import build_datasets

        self.train_set, self.val_set, self.preprocessing = build_datasets(self.config, self.downsampling_factor,
                                                                          run_dir=run_dir)
        return self.train_set, self.val_set

    def setup(self, accelerator, precision) -> None:
        """Build and prepare the discriminator when ``loss.adversarial_weight > 0``."""
        self.precision = precision
        cfg = self.config.loss
        if cfg.adversarial_weight <= 0:
            return
        discriminator = PatchDiscriminator3D(
            in_channels=self.config.model.in_channels, channels=cfg.discriminator_channels,
            num_layers=cfg.discriminator_layers, norm=cfg.discriminator_norm,
            spectral_norm=cfg.discriminator_spectral_norm,
        )
        optimizer = torch.optim.AdamW(discriminator.parameters(), lr=self.config.train.lr, betas=(0.5, 0.9))
        self.discriminator, self.disc_optimizer = accelerator.prepare(discriminator, optimizer)

    def loss(self, model, batch: dict, step: int, generator: torch.Generator):
        """L1/MSE (+SSIM, +edge term) reconstruction + beta(step) * KL [+ adversarial], float32 (VAELoss)."""
        image = batch["image"]  # (B, C, D, H, W); a MetaTensor's metadata stays with the data pipeline
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        output = model(x, generator=generator)
        logits = None
        if self.discriminator is not None and self.loss_fn.adversarial_active(step):
            logits = self.discriminator(output.reconstruction)
            self._last = (x, output.reconstruction)
        loss, parts = self.loss_fn(output, x, step, discriminator_logits=logits)
        # The weighted terms the guard judges; they sum to the loss.
        adversarial = self.config.loss.adversarial_weight * parts.get("g_adv", 0.0)
        parts["terms"] = {"reconstruction": parts["loss"] - parts["kl_weighted"] - adversarial,
                          "kl": parts["kl_weighted"]}
        if "g_adv" in parts:
            parts["terms"]["adversarial"] = adversarial
        return loss, parts

    def after_optimizer_step(self, model, batch: dict, applied: bool, step: int) -> None:
        """One discriminator update on the last micro-batch, after each applied generator step."""
        if self._last is None or not applied:
            self._last = None
            return
        real, fake = self._last
        self._last = None
        precision, discriminator, optimizer = self.precision, self.discriminator, self.disc_optimizer
        with precision.autocast():
            real_logits = discriminator(real)
            fake_logits = discriminator(fake.detach())
        d_loss = discriminator_loss(real_logits.float(), fake_logits.float(), self.config.loss.adversarial_loss)
        precision.backward(d_loss)
        precision.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(discriminator.parameters(), self.config.train.grad_clip)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    def validate(self, model, val_set, accelerator, run_dir: Path, step: int, tracker) -> dict[str, float]:
        from medvae.train.validation import validate

        if val_set is None or len(val_set) < accelerator.num_processes:
            return {}
        return validate(model, val_set, accelerator, run_dir, step, tracker)

    def export(self, model, run_dir: Path) -> None:
        """``run_dir/export``: weights, config and preprocessing, plus the prior fitted to the training
        volumes' latent means (what ``generate --prior fitted`` samples) with its copy check's
        reference: the training latents, and a threshold set by the validation volumes."""
        from medvae.prior import fit_and_save_prior

        save_model(model, run_dir / "export", preprocessing=self.preprocessing,
                   extra={"trained_with": to_dict(self.config)})
        heldout = self.val_set.data if self.val_set is not None else ()
        fit_and_save_prior(model, self.train_set.data, self.config.data, run_dir / "export", heldout_items=heldout)
