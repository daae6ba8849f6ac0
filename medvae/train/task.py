"""What one kind of model needs from the generic training runner (``medvae.train.loop.run_training``).

The runner owns everything that is the same for every model: Accelerate, mixed precision, the LR
schedule, clipping, the divergence guard, EMA, rollback snapshots, checkpoints and exact resume,
tracking and the progress bar. A task owns what differs: the model, the data, the loss, validation
and the export. The VAE is ``medvae.train.vae_task.VAETask``.

Subclass ``TrainingTask`` to inherit the defaults of the optional hooks (``setup``,
``after_optimizer_step``, ``validate``, ``export``); the runner calls every method below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Dataset


class TrainingTask(Protocol):
    """One kind of model to train: the runner calls these, in this order, on every rank."""

    name: str  # "vae", "diffusion_prior": used in log messages
    primary_term: str  # the loss term the guard watches for "rises and stays up" (VAE: "reconstruction")
    batch_size: int  # items per micro-batch per process
    samples_per_item: int = 1  # training samples one item yields (the VAE: data.crops_per_volume)
    num_workers: int = 0  # DataLoader worker processes

    def build_model(self) -> torch.nn.Module:
        """The model to train; called right after ``set_seed(train.seed)``: same init on every rank."""
        ...

    def build_data(self, run_dir: Path) -> tuple[Dataset, Dataset | None]:
        """(train_set, val_set or None). Items are dicts of tensors (plus optional "id" strings),
        collated by the runner's DataLoader and ordered by ``EpochOrderedDataset`` (exact resume)."""
        ...

    def setup(self, accelerator, precision) -> None:
        """Optional: build and ``accelerator.prepare`` extra parts (the VAE's discriminator); called
        once, after the model, optimizer and loader are prepared and before any checkpoint is loaded,
        so everything prepared here is saved and restored with the checkpoints."""

    def loss(self, model: torch.nn.Module, batch: dict, step: int,
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss, called inside ``precision.autocast()`` and
        ``accelerator.accumulate(model)`` with the prepared (DDP-wrapped) model: call ``model(...)``,
        never ``unwrap_model(model).something(...)``. ``generator`` is seeded by (seed, rank,
        micro-batch), for exact resume.

        Returns (loss, parts): ``loss`` a float32 scalar tensor; ``parts["terms"]`` maps each term's
        name to its WEIGHTED float32 scalar tensor, the terms summing to ``loss`` (the guard judges
        them and their shares of the loss); other float entries of ``parts`` are logged as
        ``train/<name>`` (terms may be tensors or floats); an optional ``parts["kl_per_channel"]`` (C,) tensor, nats per latent
        element, lets the guard report collapsed latent channels.
        """
        ...

    def after_optimizer_step(self, model: torch.nn.Module, batch: dict, applied: bool, step: int) -> None:
        """Optional: runs after every optimizer step (``applied`` False when the step was skipped or
        rolled back); the VAE updates its discriminator here."""

    def validate(self, model: torch.nn.Module, val_set: Dataset | None, accelerator, run_dir: Path, step: int,
                 tracker) -> dict[str, float]:
        """Optional: scores to log (``{}`` for none). Runs on every rank (shard the work) with the
        EMA model when EMA is on; ``model`` is unwrapped and in train mode."""
        return {}

    def model_signature(self, config: dict) -> dict:
        """Optional: the settings of a full run config (as stored in a run's config.yaml) that fix the
        function the weights compute, parameter-free ones included. Resume refuses a checkpoint
        whose signature differs from the current config's; ``{}`` (the default) checks nothing."""
        return {}

    def export(self, model: torch.nn.Module, run_dir: Path) -> None:
        """Main process only, after the last step: write ``run_dir / "export"`` (atomic files)."""
