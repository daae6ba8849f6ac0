"""``generate --prior diffusion``: find the VAE's diffusion prior, sample latents, run the copy check.

The prior folder is ``--prior-dir`` (a prior folder or a train-prior run folder), else the default
place ``medvae train-prior`` writes to: ``<model>/prior`` (``runs/x/prior`` for ``--model runs/x``).

The copy check is shared with ``generate --prior fitted``: ``copy_check_settings`` derives the
threshold when a prior is exported (from held-out volumes when there are any, else leave-one-out
among the training latents), ``copy_check_record`` turns the samples' nearest-training distances
into what generation.json records (or says why no check was possible).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

HELDOUT_SOURCE = "held-out volumes to their nearest training volume"
LEAVE_ONE_OUT_SOURCE = "each training volume to its nearest other training volume (no held-out volumes)"


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
    from medvae.prior.diffusion import COPY_REFERENCE, load_diffusion_prior
    from medvae.prior.quality import nearest_distances

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
        record.update(copy_check_record(nearest_distances(latents, prior.copy_reference), prior.config["copy_check"]))
    else:
        record.update(copy_check_record(None, reason=f"the prior folder has no {COPY_REFERENCE}"))
    return latents, volume_shape, record


def copy_check_settings(train_latents, heldout_latents=None) -> dict[str, Any]:
    """What a prior stores for the copy check (JSON): the threshold and how it was derived.

    train_latents, heldout_latents: (N, C, d, h, w) latent grids on the prior's shape. The
    reference distances are the held-out volumes' nearest-training distances (what a new patient
    looks like) when there are held-out volumes, else each training volume's distance to its nearest
    other one (leave-one-out); raises ValueError with neither held-out volumes nor 2 training ones.
    """
    from medvae.prior.quality import COPY_RATIO, copy_threshold, nearest_distances

    if heldout_latents is not None and len(heldout_latents):
        reference, source = nearest_distances(heldout_latents, train_latents), HELDOUT_SOURCE
    else:
        reference, source = nearest_distances(train_latents, train_latents, exclude_self=True), LEAVE_ONE_OUT_SOURCE
    return {"reference": source, "reference_distances": [float(x) for x in reference], "ratio": COPY_RATIO,
            "threshold": copy_threshold(reference), "num_reference_volumes": int(len(train_latents)),
            "feature_space": "posterior-mean latent grid, RMS distance per element"}


def copy_check_record(distances, settings: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
    """generation.json's ``copy_check`` and ``flagged_copy_fraction``.

    distances: each sample's nearest-training distance (``quality.nearest_distances``), judged
    against ``settings["threshold"]`` (``copy_check_settings``); None when there is nothing to
    check against: then ``copy_check`` says why (``reason``) and the fraction is null.
    """
    from medvae.prior.quality import copy_check

    if distances is None:
        return {"copy_check": {"checked": False, "reason": reason or "no copy reference"},
                "flagged_copy_fraction": None}
    check = copy_check(distances, float(settings["threshold"]))
    check.update(checked=True, reference=settings["reference"])
    return {"copy_check": check, "flagged_copy_fraction": check["flagged_fraction"]}


COPIES_NAMED = 5  # flagged files the terminal line names; generation.json marks every one


def copy_check_line(record: dict[str, Any]) -> str:
    """One line for the terminal about a generation record's copy check."""
    check = record["copy_check"]
    if not check.get("checked"):
        return f"copy check: not run ({check['reason']})"
    line = (f"copy check: {sum(check['flagged'])} of {len(check['flagged'])} samples flagged as near-copies of a "
            f"training volume (flagged fraction {check['flagged_fraction']:.3g}, threshold {check['threshold']:.4g})")
    flagged = [sample["file"] for sample in record.get("samples", []) if sample.get("flagged_copy")]
    if flagged:  # the files not to share
        shown = ", ".join(flagged[:COPIES_NAMED]) + (f" and {len(flagged) - COPIES_NAMED} more"
                                                     if len(flagged) > COPIES_NAMED else "")
        line += f"; do not share as synthetic: {shown}"
    return line

