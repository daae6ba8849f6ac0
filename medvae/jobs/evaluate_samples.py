"""``medvae evaluate-samples``: how close synthetic scans come to real ones, and whether any copies a patient.

    medvae evaluate-samples --model runs/x --samples synth/ --train train.csv [--heldout heldout.csv]
                            [--pool 2] [--json quality.json]

Every set (samples, training, held-out) goes through the VAE's own infer pipeline. Measures, each of
the samples against the training set and against the held-out set; the held-out set against the
training set is the floor (what new real patients score):

- ``frechet_distance`` and ``mmd`` on the VAE encoder's pooled latent means (posterior means,
  average-pooled to a ``pool``^3 grid per channel; ``medvae.prior.quality``). No network is fetched.
- ``intensity_w1``: Wasserstein-1 distance between the voxel-intensity histograms, in real units
  (HU for CT), and ``foreground_difference``: the difference of mean foreground fractions (voxels
  above 10% of the trained intensity range, threshold reported in real units).
- ``noise_log2_ratio``: texture, |log2| of the ratio of the sets' median robust noise levels (MAD of
  the 3-D Laplacian, in real units); the medians themselves are reported under ``noise_levels``.
  Noisy or blocky samples read above the floor, over-smooth ones too.
- the copy check: each sample's RMS latent distance to its nearest training volume (latent grids
  centre-cropped or edge-padded to the training median grid), against the held-out-to-training
  nearest distances (leave-one-out among the training volumes when no held-out set is given).
  Samples nearer than ``COPY_RATIO`` x the smallest of those are flagged as near-copies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

FOREGROUND_LEVEL = 0.1  # foreground = above this share of the trained intensity range [b_min, b_max]
MAX_VOXELS_KEPT = 2**20  # voxels per volume kept (evenly strided) for the intensity histograms


def _encode_set(loaded, sources: list[str]) -> dict[str, Any]:
    """Posterior means (list of (C, d, h, w)), real-unit voxel subsamples, noise levels and ids of one set."""
    from medvae.jobs.loading import resolve_inputs, to_real_units
    from medvae.prior.quality import noise_level

    items = resolve_inputs(sources, loaded.modality)
    means, voxels, noise = [], [], []
    with torch.no_grad():
        for item in items:
            image = loaded.prepare(item)
            means.append(loaded.encode(image).mode()[0].float().cpu())
            real = to_real_units(loaded.remove_padding(image.as_tensor(), image), loaded.preprocessing["intensity"])
            noise.append(noise_level(real))
            flat = real.reshape(-1)
            voxels.append(flat[:: max(1, flat.size // MAX_VOXELS_KEPT)])
    return {"ids": [str(i["id"]) for i in items], "means": means, "voxels": voxels, "noise": noise}


def _foreground_threshold(intensity: dict[str, Any]) -> float:
    from medvae.jobs.loading import to_real_units

    low, high = float(intensity.get("b_min", 0.0)), float(intensity.get("b_max", 1.0))
    return float(to_real_units(torch.tensor([low + FOREGROUND_LEVEL * (high - low)]), intensity)[0])


def _measures(a: dict, b: dict, pool: int, threshold: float) -> dict[str, float]:
    from medvae.prior.quality import (foreground_fraction, frechet_distance, intensity_distance, mmd, noise_distance,
                                      pooled_features)

    feats_a = np.concatenate([pooled_features(m[None], pool) for m in a["means"]])
    feats_b = np.concatenate([pooled_features(m[None], pool) for m in b["means"]])
    fg_a = [foreground_fraction(v, threshold) for v in a["voxels"]]
    fg_b = [foreground_fraction(v, threshold) for v in b["voxels"]]
    return {"frechet_distance": frechet_distance(feats_a, feats_b), "mmd": mmd(feats_a, feats_b),
            "intensity_w1": intensity_distance(a["voxels"], b["voxels"]),
            "foreground_difference": abs(float(np.mean(fg_a)) - float(np.mean(fg_b))),
            "noise_log2_ratio": noise_distance(a["noise"], b["noise"])}


def evaluate_sets(loaded, samples: dict, train: dict, heldout: dict | None, pool: int = 2) -> dict[str, Any]:
    """The evaluation of encoded sets (``_encode_set``); see the module doc."""
    from medvae.prior.gaussian import common_latent_shape, crop_or_pad
    from medvae.prior.quality import copy_check, copy_threshold, nearest_distances

    threshold = _foreground_threshold(loaded.preprocessing["intensity"])
    units = loaded.preprocessing.get("units") or ("HU" if loaded.modality == "CT" else "scanner units")
    report: dict[str, Any] = {
        "feature_spaces": {
            "frechet_distance, mmd": f"VAE posterior means average-pooled to {pool}^3 per channel (model hash "
                                     f"{loaded.hash[:12]}...)",
            "intensity_w1": f"voxel intensities in real units ({units})",
            "foreground_difference": f"share of voxels above {threshold:.4g} {units}",
            "noise_log2_ratio": f"robust noise level (MAD of the 3-D Laplacian) in {units}",
            "copy_check": "posterior-mean latent grid on the training median grid, RMS distance per element",
        },
        "counts": {"samples": len(samples["ids"]), "train": len(train["ids"]),
                   "heldout": len(heldout["ids"]) if heldout else 0},
        "samples_vs_train": _measures(samples, train, pool, threshold),
        "noise_levels": {name: float(np.median(encoded["noise"])) for name, encoded in
                         (("samples", samples), ("train", train), ("heldout", heldout)) if encoded},
    }
    if heldout:
        report["samples_vs_heldout"] = _measures(samples, heldout, pool, threshold)
        report["floor_heldout_vs_train"] = _measures(heldout, train, pool, threshold)
    grid = common_latent_shape(m.shape for m in train["means"])

    def grids(encoded: dict) -> torch.Tensor:
        return torch.stack([crop_or_pad(m, grid) for m in encoded["means"]])

    training_grids = grids(train)
    if heldout:
        reference = nearest_distances(grids(heldout), training_grids)
        source = "held-out volumes to their nearest training volume"
    else:
        reference = nearest_distances(training_grids, training_grids, exclude_self=True)
        source = "each training volume to its nearest other training volume (no held-out set)"
    check = copy_check(nearest_distances(grids(samples), training_grids), copy_threshold(reference))
    check.update(reference=source, reference_distances=[float(d) for d in reference], sample_ids=samples["ids"])
    report["copy_check"] = check
    report["flagged_copy_fraction"] = check["flagged_fraction"]
    return report


def evaluate_samples(model_dir: str | os.PathLike, samples: list[str], train: list[str], heldout: list[str] | None = None,
                     pool: int = 2, json_file: str | os.PathLike | None = None,
                     memory_budget: int | None = None) -> dict[str, Any]:
    """Evaluate synthetic volumes against real ones; print a summary, write ``json_file`` if given."""
    from medvae.atomic import atomic_file
    from medvae.jobs.loading import load_for_inference

    loaded = load_for_inference(model_dir, memory_budget=memory_budget)
    encoded_train = _encode_set(loaded, train)
    if len(encoded_train["ids"]) < 2 and not heldout:
        raise ValueError("--train: the copy check needs at least 2 training volumes, or a --heldout set")
    report = evaluate_sets(loaded, _encode_set(loaded, samples), encoded_train,
                           _encode_set(loaded, heldout) if heldout else None, pool)
    report["model"] = str(loaded.directory)
    if json_file is not None:
        with atomic_file(Path(json_file)) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("samples_vs_train", "samples_vs_heldout", "floor_heldout_vs_train"):
        if name in report:
            print(name + ": " + ", ".join(f"{k} {v:.4g}" for k, v in report[name].items()))
    print("median noise level: " + ", ".join(f"{k} {v:.4g}" for k, v in report["noise_levels"].items()))
    print(f"copy check: {sum(report['copy_check']['flagged'])} of {report['counts']['samples']} samples flagged "
          f"(threshold {report['copy_check']['threshold']:.4g})")
    return report
