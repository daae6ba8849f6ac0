"""``generate --prior diffusion``: find the VAE's diffusion prior, sample latents, run the copy check.

The prior folder is ``--prior-dir`` (a prior folder or a train-prior run folder), else the default
place ``medvae train-prior`` writes to: ``<model>/prior`` (``runs/x/prior`` for ``--model runs/x``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def default_prior_dirs(model_directory: Path) -> list[Path]:
    """Where ``train-prior --model M`` puts its run folder, for M the export or its run folder."""
    candidates = [model_directory / "prior"]
    if model_directory.name == "export":
        candidates.insert(0, model_directory.parent / "prior")
    return candidates


def parse_conditions(pairs) -> dict[str, str]:
    """``["modality=CT", "spacing=2"]`` -> ``{"modality": "CT", "spacing": "2"}``; a bad pair raises ValueError."""
    conditions: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--condition {pair!r}: expected key=value, e.g. --condition modality=CT")
        conditions[key.strip()] = value.strip()
    return conditions


def sample_diffusion_latents(loaded, num: int, seed: int, shape=None, prior_dir=None, sampler: str | None = None,
                             sampling_steps: int | None = None, guidance: float | None = None,
                             conditions=None) -> tuple[Any, tuple[int, int, int], dict[str, Any]]:
    """(latents (num, C, d, h, w), volume shape (D, H, W), what generation.json records about the prior).

    Refuses (ValueError, one line) a prior trained for other VAE weights, a missing or unknown
    condition, a sampler the prior was not trained for, and a ``--shape`` the prior cannot make.
    """
    from medvae.prior.diffusion import load_diffusion_prior
    from medvae.prior.quality import copy_check, nearest_distances

    if prior_dir is None:
        found = [p for p in default_prior_dirs(loaded.directory) if p.is_dir()]
        if not found:
            raise FileNotFoundError(f"{default_prior_dirs(loaded.directory)[0]}: no diffusion prior for this model; "
                                    "train one with `medvae train-prior --model MODEL` or give --prior-dir")
        prior_dir = found[0]
    prior = load_diffusion_prior(prior_dir, model_hash=loaded.hash)
    volume_shape = tuple(s * loaded.factor for s in prior.latent_shape[1:])
    if shape is not None and tuple(int(s) for s in shape) != volume_shape:
        raise ValueError(f"--shape {' '.join(map(str, shape))}: the diffusion prior makes volumes of "
                         f"{' '.join(map(str, volume_shape))} voxels only; drop --shape")
    condition_values = parse_conditions(conditions) if not isinstance(conditions, dict) else dict(conditions)
    sampler = sampler or prior.default_sampler
    steps = int(sampling_steps or prior.config.get("sampling_steps", 50))
    weight = float(prior.config.get("guidance", 1.0) if guidance is None else guidance)
    started = time.perf_counter()
    latents = prior.sample(num, seed, sampler=sampler, steps=steps, guidance=weight, conditions=condition_values,
                           device=loaded.device)
    seconds = (time.perf_counter() - started) / num
    record: dict[str, Any] = {
        "prior_description": prior.describe(), "latent_shape": list(prior.latent_shape),
        "sampler": sampler, "sampling_steps": steps, "guidance": weight, "conditions": condition_values,
        "sampling_seconds_per_volume": seconds,
    }
    if prior.copy_reference is not None:
        threshold = float(prior.config["copy_check"]["threshold"])
        check = copy_check(nearest_distances(latents, prior.copy_reference), threshold)
        check["reference"] = prior.config["copy_check"]["reference"]
        record["copy_check"] = check
        record["flagged_copy_fraction"] = check["flagged_fraction"]
    return latents, volume_shape, record

