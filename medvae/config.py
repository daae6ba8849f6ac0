"""The one typed configuration schema: model, data, loss, train, tracking.

YAML files in ``configs/`` hold values only; the defaults and types live here. Load with
``load_config(path, ["train.lr=3e-4", ...])``: an unknown key or a wrong type raises ``ConfigError``
naming the key. Every number that matters has a field with a one-line comment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from medvae.models.architecture import VAE3DArchitecture


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


def _choice(section: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}: {value!r} is not one of {', '.join(allowed)}")


@dataclass
class ModelConfig(VAE3DArchitecture):
    """The model section: exactly VAE3D's constructor arguments. Fields, defaults and their checks
    live in ``medvae.models.architecture.VAE3DArchitecture``; a bad value raises ConfigError here."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:
            raise ConfigError(f"model.{err}") from None


@dataclass
class IntensityConfig:
    # ct_window: clip a HU window and scale to [0, 1]; mri_percentile: scale percentiles to [0, 1];
    # zscore: zero mean, unit variance over the foreground; none: leave as is. Each has an exact inverse.
    preset: str = "mri_percentile"
    window_min: float = -1000.0  # HU mapped to 0 (ct_window)
    window_max: float = 1000.0  # HU mapped to 1 (ct_window)
    lower_percentile: float = 0.5  # percentile mapped to 0 (mri_percentile)
    upper_percentile: float = 99.5  # percentile mapped to 1 (mri_percentile)
    clip: bool = True  # clip the scaled values to [0, 1] (ct_window, mri_percentile)
    foreground_threshold: float = 0.0  # voxels above this count as foreground (zscore)

    def __post_init__(self) -> None:
        _choice("data.intensity", "preset", self.preset, ("ct_window", "mri_percentile", "zscore", "none"))
        if self.window_max <= self.window_min:
            raise ConfigError(f"data.intensity.window_max ({self.window_max}) must exceed window_min ({self.window_min})")
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ConfigError(
                f"data.intensity: need 0 <= lower_percentile < upper_percentile <= 100, "
                f"got {self.lower_percentile}, {self.upper_percentile}"
            )


@dataclass
class AugmentConfig:
    # Light train-time augmentations, applied to each random crop after intensity normalisation.
    flip_prob: float = 0.0  # left-right flip; off by default: brains are not mirror symmetric
    intensity_scale: float = 0.05  # multiply by 1 + f, f uniform in [-intensity_scale, intensity_scale]
    intensity_shift: float = 0.05  # add o, o uniform in [-intensity_shift, intensity_shift] (normalised units)
    intensity_prob: float = 0.5  # chance of each intensity augmentation per crop
    # Gaussian noise of std uniform in [0, noise_std] (normalised units), with chance intensity_prob:
    # teaches a model trained on smooth templates to pass an individual scan's texture through.
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_prob", "intensity_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.augment.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.intensity_scale < 0 or self.intensity_shift < 0:
            raise ConfigError("data.augment.intensity_scale and intensity_shift must be >= 0")
        if not 0.0 <= self.noise_std <= 1.0:
            raise ConfigError(f"data.augment.noise_std: must be in [0, 1] (normalised units), got {self.noise_std}")


@dataclass
class DataConfig:
    train: str = "demo"  # a folder, a glob, a CSV or JSON datalist, or "demo" (built-in real MRI)
    val: Optional[str] = None  # same forms; None: hold out val_fraction of train
    val_fraction: float = 0.2  # share of train held out for validation when val is None
    modality: str = "MR"  # CT or MR, when the datalist does not say per row
    spacing: Optional[List[float]] = None  # target voxel spacing in mm; None keeps each file's own
    orientation: str = "RAS"
    # Four crops of 40^3 per step (about one 64^3 crop of voxels): see benchmarks/recipe.json.
    patch_size: List[int] = field(default_factory=lambda: [40, 40, 40])  # training crop (D, H, W), voxels
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 4  # volumes per micro-batch, per process (repeated when a dataset has fewer)
    crops_per_volume: int = 1  # random crops taken from each volume; a micro-batch holds batch_size x this
    num_workers: int = 0
    cache: str = "memory"  # none, memory (CacheDataset) or disk (PersistentDataset)
    on_bad_file: str = "fail"  # fail at the first unreadable file, or skip it and list it in the run folder
    nonfinite: str = "reject"  # reject volumes with NaN/Inf, or repair them (NaN -> 0, Inf -> clip)
    frame: Optional[int] = None  # which frame of a 4D file to use; None: refuse 4D input
    dicom_series: Optional[str] = None  # SeriesInstanceUID to pick from a folder holding several

    def __post_init__(self) -> None:
        _choice("data", "modality", self.modality, ("CT", "MR"))
        _choice("data", "cache", self.cache, ("none", "memory", "disk"))
        _choice("data", "on_bad_file", self.on_bad_file, ("fail", "skip"))
        _choice("data", "nonfinite", self.nonfinite, ("reject", "repair"))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"data.patch_size: need three positive sizes, got {list(self.patch_size)}")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(0 < float(s) < float("inf")
                                                                          for s in self.spacing)):
            raise ConfigError(f"data.spacing: need three positive voxel sizes in mm, got {list(self.spacing)}")
        if not 1 <= self.crops_per_volume <= 64:
            raise ConfigError(f"data.crops_per_volume: must be in [1, 64], got {self.crops_per_volume}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")


@dataclass
class LossConfig:
    reconstruction: str = "huber"  # l1, mse or huber (MSE inside +-huber_delta, linear beyond), averaged over voxels
    huber_delta: float = 1.0  # huber: error (input intensity units) where the squared error turns linear
    ssim_weight: float = 0.0  # weight of (1 - SSIM) added to the reconstruction term
    ssim_data_range: Optional[float] = None  # intensity range for SSIM's constants; None: the target's max - min
    gradient_weight: float = 0.0  # weight of the L1 between recon and target spatial gradients (an edge term)
    kl_weight: float = 1e-6  # beta at the end of annealing, on the KL summed per volume / voxels
    kl_schedule: str = "linear"  # constant, linear, sigmoid or cyclical
    kl_warmup_steps: int = 500  # steps from 0 to kl_weight (linear, sigmoid; per cycle for cyclical)
    kl_cycle_steps: int = 2000  # cycle length in steps (cyclical)
    kl_sigmoid_steepness: float = 10.0  # logistic slope over the warm-up (sigmoid); larger is more step-like
    free_bits: float = 0.0  # nats per latent element per channel below which the KL is not penalised
    prior_std: float = 1.0  # std of the Gaussian prior; > 1 is a wider prior
    adversarial_weight: float = 0.0  # 0: no discriminator
    adversarial_loss: str = "hinge"  # hinge or lsgan
    adversarial_start_step: int = 2000  # discriminator and its loss start here
    discriminator_channels: int = 32  # width of the first PatchDiscriminator3D layer (doubles per layer, max x8)
    discriminator_layers: int = 3  # stride-2 layers; input sides must be >= 3 * 2**layers voxels
    discriminator_norm: str = "group"  # group or none
    discriminator_spectral_norm: bool = False  # spectral normalisation on every discriminator conv
    perceptual_weight: float = 0.0  # only networks that need no download; off by default

    def __post_init__(self) -> None:
        _choice("loss", "reconstruction", self.reconstruction, ("l1", "mse", "huber"))
        _choice("loss", "kl_schedule", self.kl_schedule, ("constant", "linear", "sigmoid", "cyclical"))
        _choice("loss", "adversarial_loss", self.adversarial_loss, ("hinge", "lsgan"))
        _choice("loss", "discriminator_norm", self.discriminator_norm, ("group", "none"))
        if self.kl_warmup_steps < 0 or self.kl_cycle_steps < 1:
            raise ConfigError(
                f"loss: need kl_warmup_steps >= 0 and kl_cycle_steps >= 1, "
                f"got {self.kl_warmup_steps} and {self.kl_cycle_steps}"
            )
        if self.kl_schedule == "cyclical" and self.kl_warmup_steps > self.kl_cycle_steps:
            raise ConfigError(
                f"loss.kl_warmup_steps ({self.kl_warmup_steps}) must not exceed kl_cycle_steps "
                f"({self.kl_cycle_steps}) for the cyclical schedule"
            )
        if self.prior_std <= 0:
            raise ConfigError(f"loss.prior_std: must be > 0, got {self.prior_std}")
        if self.kl_weight < 0 or self.free_bits < 0:
            raise ConfigError("loss.kl_weight and loss.free_bits must be >= 0")
        if self.huber_delta <= 0:
            raise ConfigError(f"loss.huber_delta: must be > 0, got {self.huber_delta}")
        if self.ssim_weight < 0 or self.gradient_weight < 0:
            raise ConfigError(
                "loss.ssim_weight and loss.gradient_weight must be >= 0, "
                f"got {self.ssim_weight} and {self.gradient_weight}"
            )


@dataclass
class GuardConfig:
    # The divergence guard (medvae/train/guard.py) judges, on every optimizer step: non-finite values,
    # the gradient norm before clipping, each WEIGHTED loss term with its share of the loss, the primary
    # term (reconstruction) rising and staying up, and fp16 grad-scaler skip storms. Spikes are judged
    # on log values against the median and MAD of the last `window` good steps.
    enabled: bool = True
    window: int = 100  # good steps in the running statistics (median and MAD of log values)
    min_history: int = 20  # good steps of history before spikes and rises are judged
    spike_factor: float = 10.0  # a value above spike_factor x its running median ...
    spike_mads: float = 8.0  # ... and more than this many robust deviations (1.4826 x MAD of logs) above it is a spike
    min_term_share: float = 0.05  # loss terms under this share of the loss are not judged (the KL of a low-beta VAE)
    persist_steps: int = 3  # spikes on this many of the last persist_window steps: lower the LR (consecutive: roll back)
    persist_window: int = 10
    explosion_factor: float = 1000.0  # spikes this large, persisting as above: roll back instead
    rise_window: int = 25  # steps in the recent median of the primary term (reconstruction)
    rise_factor: float = 3.0  # recent median above rise_factor x its best level: lower the LR
    rollback_rise_factor: float = 10.0  # ... above this factor: roll back
    scaler_skip_fraction: float = 0.5  # more fp16 steps skipped by the grad scaler than this share of window ...
    on_scaler_skips: str = "lower_lr"  # ... is an event with this action (fewer skips are only recorded)
    collapse_kl: float = 1e-3  # KL per element of a channel below this counts as collapsed (recorded only)
    collapse_steps: int = 1000  # ... for this many consecutive steps
    on_nonfinite: str = "rollback"  # skip, lower_lr, rollback or abort
    lr_factor: float = 0.5  # LR-scale multiplier applied by lower_lr and rollback
    recover_steps: int = 50  # after this many steps without an acted-on event the LR scale is divided by lr_factor (max 1)
    max_events: int = 20  # abort after this many steps with acted-on events ...
    event_window: int = 200  # ... within this many steps
    snapshot_every: int = 25  # steps between in-memory copies of the last good state (for rollback)

    def __post_init__(self) -> None:
        actions = ("skip", "lower_lr", "rollback", "abort")
        _choice("train.guard", "on_nonfinite", self.on_nonfinite, actions)
        _choice("train.guard", "on_scaler_skips", self.on_scaler_skips, actions)
        counts = ("window", "min_history", "persist_steps", "persist_window", "rise_window", "recover_steps",
                  "max_events", "event_window", "snapshot_every")
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.guard.{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_history > self.window:
            raise ConfigError(f"train.guard.min_history ({self.min_history}) must not exceed window ({self.window})")
        if self.rise_window > self.window:
            raise ConfigError(f"train.guard.rise_window ({self.rise_window}) must not exceed window ({self.window})")
        if self.persist_steps > self.persist_window:
            raise ConfigError(
                f"train.guard.persist_steps ({self.persist_steps}) must not exceed persist_window ({self.persist_window})"
            )
        for name in ("spike_factor", "explosion_factor", "rise_factor", "rollback_rise_factor"):
            if getattr(self, name) <= 1:
                raise ConfigError(f"train.guard.{name}: must be > 1, got {getattr(self, name)}")
        if self.spike_mads < 0 or not 0 <= self.min_term_share < 1:
            raise ConfigError("train.guard: need spike_mads >= 0 and 0 <= min_term_share < 1")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError(f"train.guard.lr_factor: must be in (0, 1], got {self.lr_factor}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/medvae"  # the run folder
    max_steps: int = 2000
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear LR warm-up
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0  # max global gradient norm
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no, fp16 or bf16
    ema_decay: Optional[float] = None  # e.g. 0.999; None disables EMA weights
    seed: int = 0
    val_every: int = 200  # steps between validations
    checkpoint_every: int = 500  # steps between accelerator.save_state
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: Optional[str] = None  # None, "auto" (newest valid checkpoint in output_dir) or a checkpoint path
    overwrite: bool = False  # start over in a non-empty output_dir (its files are moved to previous-*)
    cpu: bool = False  # force CPU processes (gloo) even where CUDA exists
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if self.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        _choice("train", "mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be >= 1, got {self.max_steps}")


@dataclass
class TrackingConfig:
    wandb_mode: str = "offline"  # online, offline or disabled; offline needs no network
    project: str = "medvae"
    run_name: Optional[str] = None
    log_every: int = 10  # steps between logged scalars
    preview_every: int = 0  # 0: preview at every validation

    def __post_init__(self) -> None:
        _choice("tracking", "wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _key_of(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    return str(key) if key else "?"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                schema: type = Config) -> Any:
    """Defaults of ``schema`` (the VAE's ``Config``, or another dataclass such as the prior's), then the
    YAML file at ``path`` (if any), then ``key=value`` overrides.

    Raises ``ConfigError`` naming the unknown or mistyped key, and the file it came from.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    source = "defaults"
    try:
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise ConfigError(f"{path}: config file not found")
            loaded = OmegaConf.load(path)
            if loaded is None or not hasattr(loaded, "keys"):
                loaded = OmegaConf.create({})
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            source = f"override {item!r}"
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        return OmegaConf.to_object(merged)  # builds the dataclasses, running their checks
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source not in str(err) else str(err)) from None
    except OmegaConfBaseException as err:
        first_line = str(err).splitlines()[0]
        key = _key_of(err)
        if "not in" in first_line:
            raise ConfigError(f"{source}: unknown key '{key}'") from None
        raise ConfigError(f"{source}: bad value for '{key}': {first_line}") from None


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict of a Config (for logging and for the run folder's config.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))
