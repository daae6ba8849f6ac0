"""The configuration of ``medvae train-prior``: latents, diffusion model, training, tracking.

Loaded like the VAE's config (``medvae.config.load_config(path, overrides, schema=PriorConfig)``):
YAML values, dotted ``key=value`` overrides, ``ConfigError`` naming a bad key. ``train`` and
``tracking`` are the VAE's own sections (the same runner trains both), with prior-specific defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from medvae.config import ConfigError, TrackingConfig, TrainConfig, _choice

CONDITION_KEYS = ("modality", "spacing")


@dataclass
class LatentsConfig:
    train: Optional[str] = None  # datalist to encode; None: the VAE's own training datalist (its config)
    val: Optional[str] = None  # held-out datalist (copy-check reference); None: the VAE's validation part
    shape: Optional[List[int]] = None  # common latent grid (d, h, w); None: per-axis median, padded to fit the UNet
    batch_size: int = 4  # latents per process per micro-batch
    num_workers: int = 0
    # Prior space = (z - per-channel mean) * scale: "global", one over the std of all channels (latent
    # diffusion's scale factor); "channel", one over each channel's own std (benchmarks/RESULTS.md,
    # "Priors over the DCT-shortcut VAE": mixed on one fold, so not the default).
    scaling: str = "global"

    def __post_init__(self) -> None:
        if self.shape is not None and (len(self.shape) != 3 or min(self.shape) < 1):
            raise ConfigError(f"latents.shape: need three positive sizes d h w, got {list(self.shape)}")
        if self.batch_size < 1:
            raise ConfigError(f"latents.batch_size: must be >= 1, got {self.batch_size}")
        if self.scaling not in ("channel", "global"):
            raise ConfigError(f"latents.scaling: must be channel or global, got {self.scaling!r}")


@dataclass
class DiffusionConfig:
    # MONAI DiffusionModelUNet (spatial_dims=3) over the scaled latents.
    channels: List[int] = field(default_factory=lambda: [64, 128, 256])  # width per level
    attention_levels: List[bool] = field(default_factory=lambda: [False, False, True])  # self/cross-attention per level
    num_res_blocks: int = 2  # residual blocks per level
    norm_num_groups: int = 32
    num_head_channels: int = 32  # channels per attention head
    # Training objective: rflow (rectified flow, velocity target, MAISI) or ddpm (noise target, MONAI LDM tutorial).
    scheduler: str = "rflow"
    num_train_timesteps: int = 1000  # discrete timesteps of the noise schedule
    beta_schedule: str = "scaled_linear_beta"  # ddpm: MONAI's beta schedule name
    beta_start: float = 0.0015  # ddpm: first beta (the MONAI latent diffusion tutorial's value)
    beta_end: float = 0.0195  # ddpm: last beta
    timestep_sampling: str = "uniform"  # rflow training times: uniform or logit-normal
    conditions: List[str] = field(default_factory=lambda: ["modality", "spacing"])  # [] for an unconditional prior
    condition_dropout: float = 0.1  # share of training latents seen without conditions (classifier-free guidance)
    sampler: Optional[str] = None  # generate's default: rflow for rflow; ddim for ddpm (also: ddpm)
    sampling_steps: int = 50  # generate's default number of sampling steps
    guidance: float = 1.0  # generate's default classifier-free guidance weight (1: plain conditional)
    # Memorisation watch: at every validation, draw copy_probe latents (copy_probe_steps sampling steps,
    # fixed seeds) from the model being trained and run the copy check on them against the training
    # latents. Logged as val/copy_flagged_fraction; a flagged sample writes a copy_risk event
    # (events.jsonl, wandb alert). A prior trained long on few volumes starts reproducing them. 0: off.
    copy_probe: int = 4
    copy_probe_steps: int = 20
    # Which weights the prior folder gets: "last" (the EMA weights at max_steps) or "lowest_val_loss"
    # (the validation with the lowest held-out diffusion loss; kept in the run folder as best_val.*,
    # so resume keeps it). On few volumes the held-out loss turns up before the copy probe flags.
    export_weights: str = "last"

    def __post_init__(self) -> None:
        _choice("diffusion", "scheduler", self.scheduler, ("rflow", "ddpm"))
        _choice("diffusion", "timestep_sampling", self.timestep_sampling, ("uniform", "logit-normal"))
        if self.sampler is not None:
            _choice("diffusion", "sampler", self.sampler, allowed_samplers(self.scheduler))
        if len(self.channels) != len(self.attention_levels) or not self.channels:
            raise ConfigError("diffusion.channels and diffusion.attention_levels need the same, non-zero length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(f"diffusion.channels {list(self.channels)}: each must be a multiple of "
                              f"norm_num_groups={self.norm_num_groups}")
        unknown = [c for c in self.conditions if c not in CONDITION_KEYS]
        if unknown:
            raise ConfigError(f"diffusion.conditions: {unknown[0]!r} is not one of {', '.join(CONDITION_KEYS)}")
        if self.conditions and not any(self.attention_levels):
            raise ConfigError("diffusion.conditions need cross-attention: set at least one diffusion.attention_levels")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError(f"diffusion.condition_dropout: must be in [0, 1), got {self.condition_dropout}")
        for name in ("sampling_steps", "copy_probe_steps"):
            if not 1 <= getattr(self, name) <= self.num_train_timesteps:
                raise ConfigError(f"diffusion.{name}: must be in 1..{self.num_train_timesteps}")
        _choice("diffusion", "export_weights", self.export_weights, ("last", "lowest_val_loss"))
        if self.copy_probe < 0:
            raise ConfigError(f"diffusion.copy_probe: must be >= 0 (0: off), got {self.copy_probe}")


def allowed_samplers(scheduler: str) -> tuple[str, ...]:
    """Samplers that fit a training objective: a velocity model steps by rflow; a noise model by ddpm or ddim."""
    return ("rflow",) if scheduler == "rflow" else ("ddim", "ddpm")


def _prior_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="", max_steps=2000, lr=1e-4, warmup_steps=100, weight_decay=0.0,
                       ema_decay=0.999, val_every=500, checkpoint_every=500)


@dataclass
class PriorConfig:
    model: str = ""  # the VAE: run or export folder (``--model``)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=_prior_train_defaults)  # output_dir "": <model>/prior
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(project="medvae-prior"))
