"""The latent diffusion prior: MONAI's DiffusionModelUNet and schedulers over the VAE's scaled latents.

Training objective (``diffusion.scheduler``), both through MONAI's ``DiffusionInferer``:

- ``rflow``: rectified flow (``RFlowScheduler``, as NVIDIA's MAISI): x_t = (1 - t) z + t n, the
  network predicts the velocity z - n; sampled by Euler steps (sampler ``rflow``).
- ``ddpm``: ``DDPMScheduler`` (as MONAI's 3D latent diffusion tutorial): the network predicts the
  noise; sampled by ``ddpm`` (ancestral) or ``ddim`` (deterministic, eta 0, fewer steps).

Conditions (optional): the modality (one-hot over the training modalities) and the native voxel
spacing (log2 mm) enter the UNet by cross-attention as a context vector (B, 1, E) whose first entry
flags "conditioned". With classifier-free guidance, the unconditioned context is all -1 (MONAI's
``cfg_fill_value``); training drops the conditions of ``condition_dropout`` of the latents.

The prior folder (``save_diffusion_prior``): ``diffusion_prior.safetensors`` (UNet weights, EMA when
trained with EMA), ``copy_reference.safetensors`` (the training latents, for the copy check: as
private as the training scans themselves) and ``config.json`` (UNet arguments, scheduler, latent
shape, shift and scale factor, conditions, copy-check threshold, and the provenance: the VAE's
weights hash and preprocessing). ``load_diffusion_prior`` refuses a prior made for other VAE weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PRIOR_WEIGHTS = "diffusion_prior.safetensors"
COPY_REFERENCE = "copy_reference.safetensors"
CONFIG_NAME = "config.json"
PRIOR_FORMAT = "medvae-diffusion-prior"
UNCONDITIONED = -1.0  # the context value meaning "no condition" (MONAI's cfg_fill_value)


def unet_arguments(diffusion, latent_channels: int, context_dim: int) -> dict[str, Any]:
    """Keyword arguments of MONAI's DiffusionModelUNet for a ``DiffusionConfig`` (JSON-able)."""
    return {
        "spatial_dims": 3, "in_channels": latent_channels, "out_channels": latent_channels,
        "channels": list(diffusion.channels), "attention_levels": list(diffusion.attention_levels),
        "num_res_blocks": int(diffusion.num_res_blocks), "norm_num_groups": int(diffusion.norm_num_groups),
        "num_head_channels": int(diffusion.num_head_channels),
        "with_conditioning": context_dim > 0, "cross_attention_dim": context_dim or None,
    }


def build_unet(arguments: dict[str, Any]) -> torch.nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**arguments)


def scheduler_arguments(diffusion) -> dict[str, Any]:
    """The training scheduler's description (JSON-able), kept in the prior's config."""
    return {"kind": diffusion.scheduler, "num_train_timesteps": int(diffusion.num_train_timesteps),
            "beta_schedule": diffusion.beta_schedule, "beta_start": float(diffusion.beta_start),
            "beta_end": float(diffusion.beta_end), "timestep_sampling": diffusion.timestep_sampling}


def build_scheduler(arguments: dict[str, Any], sampler: str | None = None):
    """MONAI scheduler: the training one (``sampler`` None) or a sampler (rflow, ddpm, ddim) of the same schedule."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    kind = sampler or arguments["kind"]
    steps = arguments["num_train_timesteps"]
    if kind == "rflow":
        return RFlowScheduler(num_train_timesteps=steps, use_discrete_timesteps=True,
                              sample_method=arguments.get("timestep_sampling", "uniform"))
    betas = {"schedule": arguments["beta_schedule"], "beta_start": arguments["beta_start"],
             "beta_end": arguments["beta_end"]}
    if kind == "ddim":
        return DDIMScheduler(num_train_timesteps=steps, clip_sample=False, **betas)
    return DDPMScheduler(num_train_timesteps=steps, clip_sample=False, **betas)


@dataclass
class ConditionSpec:
    """How conditions become the UNet's context vector (E numbers): [flag, one-hot modality..., log2 spacing]."""

    keys: list[str]  # subset of ("modality", "spacing"), in this order
    modalities: list[str]  # the modality vocabulary (one-hot order)
    seen: list[str] | None = None  # the modalities of the training volumes (None: every one in the vocabulary)

    @property
    def size(self) -> int:
        if not self.keys:
            return 0
        return 1 + (len(self.modalities) if "modality" in self.keys else 0) + (1 if "spacing" in self.keys else 0)

    def vector(self, conditions: dict[str, Any], where: str = "--condition") -> torch.Tensor:
        """(E,) float32 context of one volume's conditions; a missing or unknown value raises ValueError."""
        values = [1.0]
        for key in self.keys:
            if key not in conditions or conditions[key] in (None, ""):
                raise ValueError(f"{where}: the prior is conditioned on {', '.join(self.keys)}; "
                                 f"give {key}=VALUE (e.g. --condition {key}={self.example(key)})")
            if key == "modality":
                modality = str(conditions[key]).upper()
                known = self.seen if self.seen is not None else self.modalities
                if modality not in known:
                    raise ValueError(f"{where}: modality={conditions[key]} was not in the training data "
                                     f"({', '.join(known)})")
                values += [float(modality == m) for m in self.modalities]
            else:
                try:
                    spacing = float(conditions[key])
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: spacing={conditions[key]!r} is not a number of mm") from None
                if not (math.isfinite(spacing) and spacing > 0):
                    raise ValueError(f"{where}: spacing={conditions[key]!r} must be a positive number of mm")
                values.append(math.log2(spacing))
        return torch.tensor(values, dtype=torch.float32)

    def example(self, key: str) -> str:
        return (self.seen or self.modalities)[0] if key == "modality" and self.modalities else "1.0"

    def to_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "modalities": list(self.modalities), "seen": self.seen, "size": self.size,
                "layout": "[1 (conditioned), one-hot modality, log2 native spacing mm]; all -1 = unconditioned"}


def training_loss(model, inferer, latents: torch.Tensor, context: torch.Tensor | None, kind: str,
                  num_train_timesteps: int, condition_dropout: float, generator: torch.Generator,
                  timestep_sampling: str = "uniform") -> torch.Tensor:
    """Float32 mean-squared error of one micro-batch of scaled latents (B, C, d, h, w).

    Noise, timesteps and condition dropout come from ``generator`` (exact resume). ``context``
    (B, 1, E) or None. The target is the noise (ddpm) or the velocity z - n (rflow).
    """
    device = latents.device
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if kind == "rflow" and timestep_sampling == "logit-normal":
        fraction = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    else:
        fraction = torch.rand(batch, generator=generator, device=device)
    timesteps = (fraction * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    if context is not None and condition_dropout > 0:
        dropped = torch.rand(batch, generator=generator, device=device) < condition_dropout
        context = torch.where(dropped[:, None, None], torch.full_like(context, UNCONDITIONED), context)
    prediction = inferer(inputs=latents, diffusion_model=model, noise=noise, timesteps=timesteps, condition=context)
    target = noise if kind == "ddpm" else latents - noise
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


class DiffusionPrior:
    """A trained diffusion prior, ready to sample raw VAE latents (N, C, d, h, w)."""

    def __init__(self, unet: torch.nn.Module, config: dict[str, Any], directory: Path | None = None,
                 copy_reference: torch.Tensor | None = None) -> None:
        self.unet = unet.eval()
        self.config = config
        self.directory = directory
        self.copy_reference = copy_reference  # (N, C, d, h, w) raw training latents, or None
        self.latent_shape = tuple(int(s) for s in config["latent_shape"])
        self.shift = torch.tensor(config["shift"], dtype=torch.float32)[:, None, None, None]
        # Per-channel "scale"; priors written before it hold one "scale_factor" for every channel.
        scale = config["scale"] if "scale" in config else [float(config["scale_factor"])] * self.latent_shape[0]
        self.scale = torch.tensor(scale, dtype=torch.float32)[:, None, None, None]
        described = config["conditions"]
        self.conditions = ConditionSpec(list(described["keys"]), list(described["modalities"]), described.get("seen"))

    @property
    def default_sampler(self) -> str:
        return str(self.config.get("default_sampler") or ("rflow" if self.config["scheduler"]["kind"] == "rflow"
                                                            else "ddim"))

    def check_sampler(self, sampler: str) -> None:
        from medvae.prior.config import allowed_samplers

        allowed = allowed_samplers(self.config["scheduler"]["kind"])
        if sampler not in allowed:
            raise ValueError(f"--sampler {sampler}: a prior trained with {self.config['scheduler']['kind']} "
                             f"samples with {' or '.join(allowed)}")

    def context(self, conditions: dict[str, Any] | None) -> torch.Tensor | None:
        """(1, 1, E) context for ``conditions``, or None for an unconditional prior."""
        if not self.conditions.keys:
            if conditions:
                raise ValueError(f"--condition {', '.join(conditions)}: this prior is unconditional")
            return None
        unknown = sorted(set(conditions or {}) - set(self.conditions.keys))
        if unknown:
            raise ValueError(f"--condition {unknown[0]}: the prior knows only {', '.join(self.conditions.keys)}")
        return self.conditions.vector(conditions or {})[None, None]

    @torch.no_grad()
    def sample(self, num: int, seed: int, sampler: str | None = None, steps: int | None = None,
               guidance: float = 1.0, conditions: dict[str, Any] | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """(num, C, d, h, w) raw latents (unscaled), decodable by the VAE; on the CPU, float32.

        Sample i depends only on (seed, i): its start noise comes from a generator seeded by
        (seed, i), and the global RNG (which DDPM's steps draw from) is seeded the same way inside
        a forked RNG state. ``guidance`` w: output = uncond + w (cond - uncond); 1 is plain conditional.
        """
        from monai.inferers import DiffusionInferer

        sampler = sampler or self.default_sampler
        self.check_sampler(sampler)
        steps = int(steps or self.config.get("sampling_steps", 50))
        total = int(self.config["scheduler"]["num_train_timesteps"])
        if not 1 <= steps <= total:
            raise ValueError(f"--sampling-steps {steps}: must be in 1..{total}")
        context = self.context(conditions)
        use_guidance = context is not None and guidance != 1.0
        unet = self.unet.to(device)
        results = []
        for index in range(num):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            noise = torch.randn((1, *self.latent_shape), generator=generator).to(device)
            scheduler = build_scheduler(self.config["scheduler"], sampler)
            if sampler == "rflow":
                scheduler.set_timesteps(steps, device=device, input_img_size_numel=math.prod(self.latent_shape[1:]))
            else:
                scheduler.set_timesteps(steps, device=device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + index)
                scaled = DiffusionInferer(scheduler).sample(
                    input_noise=noise, diffusion_model=unet, scheduler=scheduler, verbose=False,
                    conditioning=None if context is None else context.to(device),
                    cfg=float(guidance) if use_guidance else None, cfg_fill_value=UNCONDITIONED)
            results.append(scaled.float().cpu()[0] / self.scale + self.shift)
        return torch.stack(results)

    def describe(self) -> dict[str, Any]:
        """What generation.json records about the prior."""
        keep = ("latent_shape", "scale", "scale_factor", "scheduler", "conditions", "model_hash", "step", "copy_check",
                "exported_weights")
        return {"kind": "diffusion", "directory": str(self.directory) if self.directory else None,
                **{k: self.config[k] for k in keep if k in self.config}}


def save_diffusion_prior(directory: str | os.PathLike, unet: torch.nn.Module, config: dict[str, Any],
                         copy_reference: torch.Tensor) -> Path:
    """Write the prior folder atomically (weights, copy reference, config.json); return it."""
    from safetensors.torch import save_file

    from medvae.atomic import atomic_directory

    state = {name: t.detach().to("cpu").contiguous() for name, t in unet.state_dict().items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / PRIOR_WEIGHTS), metadata={"format": PRIOR_FORMAT})
        save_file({"latents": copy_reference.float().contiguous()}, str(tmp / COPY_REFERENCE),
                  metadata={"format": PRIOR_FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps({"format": PRIOR_FORMAT, **config}, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def resolve_prior_dir(path: str | os.PathLike) -> Path:
    """Accept a prior folder or a train-prior run folder (whose prior lives in ``run/export``)."""
    p = Path(path)
    for candidate in (p, p / "export"):
        if (candidate / PRIOR_WEIGHTS).is_file():
            return candidate
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such diffusion prior folder; train one with `medvae train-prior`")
    raise FileNotFoundError(f"{p}: not a diffusion prior (no {PRIOR_WEIGHTS} here or in {p / 'export'})")


def load_diffusion_prior(path: str | os.PathLike, model_hash: str | None = None) -> DiffusionPrior:
    """Load a prior folder; with ``model_hash``, refuse a prior trained on another VAE's latents."""
    from safetensors.torch import load_file

    directory = resolve_prior_dir(path)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: unreadable prior config ({' '.join(str(err).split())})") from None
    if config.get("format") != PRIOR_FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME}: not a medvae diffusion prior config")
    if model_hash is not None and config.get("model_hash") != model_hash:
        raise ValueError(f"{directory}: this prior was trained on the latents of another VAE (weights hash "
                         f"{str(config.get('model_hash'))[:12]}..., the model's is {model_hash[:12]}...)")
    try:
        unet = build_unet(config["unet"])
        unet.load_state_dict(load_file(str(directory / PRIOR_WEIGHTS)))
        reference_file = directory / COPY_REFERENCE
        reference = load_file(str(reference_file))["latents"] if reference_file.is_file() else None
    except (OSError, KeyError, RuntimeError, TypeError) as err:
        raise ValueError(f"{directory}: unreadable diffusion prior ({' '.join(str(err).split())[:200]})") from None
    return DiffusionPrior(unet, config, directory, reference)
