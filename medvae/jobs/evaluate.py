"""``medvae evaluate``: reconstruction quality per volume and over all, with MONAI's metrics.

    medvae evaluate --model runs/x [--json scores.json] scan.nii.gz dicom_series/ list.csv

Each input is prepared by the model's infer pipeline and reconstructed from its posterior mean
(memory-bounded encode and decode). The metrics compare reconstruction and input on the model's
grid (its orientation and spacing), with the pad-to-a-multiple cropped off, on the NORMALISED
intensity scale:

- ct_window / mri_percentile presets: the range [0, 1] (data_range 1); the reconstruction is
  clipped to [0, 1], as the written reconstructions are.
- zscore / none: no fixed range; data_range is each input's own max - min.

PSNR (``monai.metrics.PSNRMetric``), SSIM (``SSIMMetric``, Gaussian window 11, sigma 1.5; smaller
odd windows for volumes under 11 voxels a side) and MS-SSIM (``MultiScaleSSIMMetric``: the standard
5 scales and weights need sides over 160 voxels, so smaller volumes get the most scales that fit,
with the first weights renormalised, and a smaller window where even 2 scales of 11 do not fit; each
volume's settings are in the output). For CT, the mean absolute error in HU between the two after
the inverse window (values outside the window count as its edges). Per volume, then mean and median.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from medvae.jobs.loading import LoadedModel, load_for_inference, resolve_inputs, to_real_units

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, 5 scales
KERNELS = (11, 7, 5, 3)  # Gaussian window sizes, the standard first
CLIPPED_PRESETS = ("ct_window", "mri_percentile")


def ssim_kernel(min_side: int) -> int | None:
    """The largest window of KERNELS that fits a volume whose shortest side is ``min_side``."""
    return next((k for k in KERNELS if k <= min_side), None)


def ms_ssim_settings(min_side: int) -> tuple[int, tuple[float, ...]] | None:
    """(window, weights) for MS-SSIM on a volume whose shortest side is ``min_side``, or None.

    Prefers the standard window with as many scales as fit (at least 2), then smaller windows; a
    scale s needs min_side // 2**(s-1) >= window (and MONAI's own check, min_side // (s-1)**2 > window-1).
    """
    def fits(window: int, scales: int) -> bool:
        return (min_side // 2 ** (scales - 1) >= window
                and min_side // max(1, scales - 1) ** 2 > window - 1)

    for minimum_scales in (2, 1):
        for window in KERNELS:
            for scales in range(len(MS_SSIM_WEIGHTS), minimum_scales - 1, -1):
                if fits(window, scales):
                    weights = MS_SSIM_WEIGHTS[:scales]
                    return window, tuple(w / sum(weights) for w in weights)
    return None


def _range(loaded: LoadedModel, target: torch.Tensor) -> tuple[float, str]:
    intensity = loaded.preprocessing["intensity"]
    if intensity.get("preset") in CLIPPED_PRESETS and intensity.get("clip"):
        low, high = float(intensity.get("b_min", 0.0)), float(intensity.get("b_max", 1.0))
        return high - low, f"normalised [{low:g}, {high:g}] ({intensity['preset']})"
    preset = intensity.get("preset")
    return float(target.max() - target.min()), f"normalised ({preset}), data_range = each input's max - min"


def score_volume(loaded: LoadedModel, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """Metrics of one reconstruction (1, D, H, W) against its normalised input (1, D, H, W)."""
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

    intensity = loaded.preprocessing["intensity"]
    data_range, _ = _range(loaded, target)
    if intensity.get("preset") in CLIPPED_PRESETS and intensity.get("clip"):
        prediction = prediction.clamp(float(intensity.get("b_min", 0.0)), float(intensity.get("b_max", 1.0)))
    y_pred, y = prediction[None].double(), target[None].double()  # (1, 1, D, H, W)
    min_side = min(target.shape[1:])
    scores: dict[str, Any] = {"shape": list(target.shape[1:]), "data_range": data_range}
    scores["psnr"] = float(PSNRMetric(max_val=data_range)(y_pred, y).item()) if data_range > 0 else math.nan
    window = ssim_kernel(min_side)
    scores["ssim_window"] = window
    scores["ssim"] = (float(SSIMMetric(spatial_dims=3, data_range=data_range, win_size=window)(y_pred, y).item())
                      if window and data_range > 0 else math.nan)
    settings = ms_ssim_settings(min_side)
    scores["ms_ssim_window"], scores["ms_ssim_scales"] = (settings[0], len(settings[1])) if settings else (None, 0)
    scores["ms_ssim"] = (float(MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=settings[0],
                                                    weights=settings[1])(y_pred, y).item())
                         if settings and data_range > 0 else math.nan)
    if loaded.modality == "CT":
        real_pred, real = to_real_units(prediction, intensity), to_real_units(target, intensity)
        scores["mae_hu"] = float(abs(real_pred.astype("float64") - real).mean())
    return scores


def _aggregate(volumes: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    summary = {}
    for name in names:
        values = [v[name] for v in volumes if not math.isnan(v[name])]
        summary[name] = ({"mean": statistics.fmean(values), "median": statistics.median(values), "count": len(values)}
                         if values else {"mean": math.nan, "median": math.nan, "count": 0})
    return summary


def _table(volumes: list[dict[str, Any]], aggregate: dict[str, dict[str, float]], names: list[str]) -> str:
    width = max([len(v["id"]) for v in volumes] + [6])
    lines = [f"{'volume':<{width}}  " + "  ".join(f"{n:>9}" for n in names)]
    lines += [f"{v['id']:<{width}}  " + "  ".join(f"{v[n]:9.4f}" for n in names) for v in volumes]
    for stat in ("mean", "median"):
        lines.append(f"{stat:<{width}}  " + "  ".join(f"{aggregate[n][stat]:9.4f}" for n in names))
    return "\n".join(lines)


def _without_nan(value: Any) -> Any:
    """NaN (a metric that does not apply) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value


def evaluate(model_dir: str | os.PathLike, inputs: list, json_file: str | os.PathLike | None = None,
             memory_budget: int | None = None) -> dict[str, Any]:
    """Score every input, print the table, write ``json_file`` (atomically) if given; return the report."""
    from medvae.atomic import atomic_file

    if json_file is not None and Path(json_file).is_dir():
        raise IsADirectoryError(f"{json_file}: --json is a folder, not a file")
    loaded = load_for_inference(model_dir, memory_budget=memory_budget)
    items = resolve_inputs(inputs, loaded.modality)
    volumes, range_text = [], ""
    for item in items:
        image = loaded.prepare(item)  # (1, D, H, W) normalised, padded
        prediction = loaded.remove_padding(loaded.reconstruct(image), image)
        target = loaded.remove_padding(image.as_tensor(), image)
        range_text = _range(loaded, target)[1]
        volumes.append({"id": item["id"], "path": str(Path(item["image"]).resolve()),
                        **score_volume(loaded, prediction, target)})
    names = ["psnr", "ssim", "ms_ssim"] + (["mae_hu"] if loaded.modality == "CT" else [])
    aggregate = _aggregate(volumes, names)
    report = {
        "command": "evaluate", "model": str(loaded.directory), "model_hash": loaded.hash,
        "intensity_range": range_text,
        "grid": "the model's preprocessed grid (orientation, spacing), padding removed",
        "metrics": {"psnr": "monai.metrics.PSNRMetric, dB", "ssim": "monai.metrics.SSIMMetric (3D Gaussian window)",
                    "ms_ssim": "monai.metrics.MultiScaleSSIMMetric (scales and window per volume)",
                    **({"mae_hu": "mean absolute error in HU inside the CT window"} if "mae_hu" in names else {})},
        "volumes": volumes, "aggregate": aggregate,
    }
    print(f"medvae evaluate: {len(volumes)} volume(s); metrics on the {range_text} intensity range")
    print(_table(volumes, aggregate, names))
    if json_file is not None:
        with atomic_file(json_file) as tmp:
            tmp.write_text(json.dumps(_without_nan(report), indent=2) + "\n")
    return report
