"""Intensity presets: real units (HU, scanner units) <-> the network's scale, with an exact inverse.

Each preset is one affine map per volume, recorded in the image's metadata so it can be undone:

- ``ct_window``: clip the HU window [window_min, window_max] and scale it to [0, 1]. The window is
  fixed, so every volume uses the same map.
- ``mri_percentile``: scale the volume's lower..upper percentiles (0.5..99.5) to [0, 1], clipped.
  The percentiles are measured per volume.
- ``none``: leave intensities as they are (for data normalised elsewhere, and for stress tests
  of training on raw HU). The inverse is the identity.
- ``zscore``: subtract the mean and divide by the standard deviation of the foreground (voxels
  above ``foreground_threshold``), applied to every voxel. Measured per volume.

The transforms write ``image.meta["intensity"]``, e.g. ``{"preset": "ct_window", "a_min": -1000.0,
"a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True}``; ``invert_intensity(x, params)`` maps
network values back to real units. Values that were clipped come back at the window edges
(a -1024 HU voxel under a -1000..1000 window comes back as -1000 HU); everything else exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from statistics import median
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensity, ScaleIntensityRange

from medvae.config import DataConfig, IntensityConfig

PRESETS = ("ct_window", "mri_percentile", "zscore", "none")
PER_VOLUME_PRESETS = ("mri_percentile", "zscore")  # parameters measured on each volume


def _source(image: Any) -> str:
    meta = getattr(image, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<volume>"))


def _record(image: Any, params: dict[str, Any]) -> Any:
    if hasattr(image, "meta"):
        image.meta["intensity"] = params
    return image


class CTWindowd(MapTransform):
    """Clip a HU window and scale it to [0, 1] (MONAI ``ScaleIntensityRange``); records the window.

    Input and output: (C, D, H, W) MetaTensor; input in HU.
    """

    def __init__(self, keys: KeysCollection, window_min: float = -1000.0, window_max: float = 1000.0,
                 clip: bool = True) -> None:
        super().__init__(keys)
        if not window_max > window_min:
            raise ValueError(f"CT window: window_max ({window_max}) must exceed window_min ({window_min})")
        self.params = {"preset": "ct_window", "a_min": float(window_min), "a_max": float(window_max),
                       "b_min": 0.0, "b_max": 1.0, "clip": bool(clip)}
        self.scale = ScaleIntensityRange(a_min=window_min, a_max=window_max, b_min=0.0, b_max=1.0, clip=clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _record(self.scale(d[key]), dict(self.params))
        return d


class PercentileScaled(MapTransform):
    """Scale the volume's ``lower``..``upper`` percentiles to [0, 1]; records the values found.

    The same map as MONAI's ``ScaleIntensityRangePercentiles`` (relative=False), with the measured
    percentiles kept as ``a_min``/``a_max`` for the inverse. Refuses a volume whose two percentiles
    coincide (mostly constant), naming the file.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, clip: bool = True) -> None:
        super().__init__(keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentile scaling: need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.clip = float(lower), float(upper), bool(clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=np.float32)
            low, high = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
            if not high > low:
                raise ValueError(
                    f"{_source(image)}: the {self.lower:g}th and {self.upper:g}th intensity percentiles are both "
                    f"{low:g}; the volume is (almost) constant and cannot be percentile-scaled"
                )
            params = {"preset": "mri_percentile", "lower_percentile": self.lower, "upper_percentile": self.upper,
                      "a_min": low, "a_max": high, "b_min": 0.0, "b_max": 1.0, "clip": self.clip}
            scaled = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=self.clip)(image)
            d[key] = _record(scaled, params)
        return d


class ForegroundZScored(MapTransform):
    """Zero mean, unit variance measured over the foreground (voxels > ``threshold``), applied to all voxels.

    MONAI ``NormalizeIntensity`` with the foreground's mean and std as subtrahend and divisor; both
    are recorded. Refuses a volume with fewer than two foreground voxels or a constant foreground.
    """

    def __init__(self, keys: KeysCollection, threshold: float = 0.0) -> None:
        super().__init__(keys)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=np.float64)
            foreground = values[values > self.threshold]
            if foreground.size < 2:
                raise ValueError(
                    f"{_source(image)}: no foreground for z-score normalisation "
                    f"({foreground.size} voxels above foreground_threshold={self.threshold:g})"
                )
            mean, std = float(foreground.mean()), float(foreground.std())
            if not std > 0:
                raise ValueError(f"{_source(image)}: the foreground is constant ({mean:g}); cannot z-score it")
            params = {"preset": "zscore", "foreground_threshold": self.threshold, "mean": mean, "std": std}
            d[key] = _record(NormalizeIntensity(subtrahend=mean, divisor=std)(image), params)
        return d


class RecordIdentityd(MapTransform):
    """The ``none`` preset: intensities pass through unchanged; records that nothing was done."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _record(d[key], {"preset": "none"})
        return d


def intensity_transform(config: IntensityConfig, keys: KeysCollection = "image") -> MapTransform:
    """The dictionary transform for ``config.preset``."""
    if config.preset == "ct_window":
        return CTWindowd(keys, config.window_min, config.window_max, clip=config.clip)
    if config.preset == "mri_percentile":
        return PercentileScaled(keys, config.lower_percentile, config.upper_percentile, clip=config.clip)
    if config.preset == "zscore":
        return ForegroundZScored(keys, config.foreground_threshold)
    if config.preset == "none":
        return RecordIdentityd(keys)
    raise ValueError(f"data.intensity.preset: {config.preset!r} is not one of {', '.join(PRESETS)}")


def invert_intensity(x: torch.Tensor | np.ndarray, params: Mapping[str, Any]) -> torch.Tensor | np.ndarray:
    """Map normalised values back to real units (HU for CT): the exact inverse of the preset's map.

    ``x``: any shape, tensor or array (returned as the same type, float). ``params``: one volume's
    ``meta["intensity"]``, or the ``"intensity"`` entry of ``preprocessing_description`` (training-set
    medians for the per-volume presets). Values that were clipped come back at the window edges.
    """
    preset = params.get("preset")
    try:
        if preset == "none":
            return x * 1.0
        if preset == "zscore":
            mean, std = float(params["mean"]), float(params["std"])
            return x * std + mean
        if preset in ("ct_window", "mri_percentile"):
            a_min, a_max = float(params["a_min"]), float(params["a_max"])
            b_min, b_max = float(params.get("b_min", 0.0)), float(params.get("b_max", 1.0))
            return (x - b_min) / (b_max - b_min) * (a_max - a_min) + a_min
    except (KeyError, TypeError) as err:
        raise ValueError(f"intensity parameters {dict(params)!r} lack a value needed to invert {preset}: {err}") from None
    raise ValueError(f"intensity parameters: unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")


def summarize_intensity(per_volume: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Training-set summary of per-volume parameters: the median of each number, and the count.

    This is what ``generate`` uses to map samples (which belong to no input volume) back to real units.
    """
    if not per_volume:
        raise ValueError("no training volumes to summarise the intensity parameters of")
    presets = {p["preset"] for p in per_volume}
    if len(presets) != 1:
        raise ValueError(f"training volumes were normalised with different presets: {sorted(presets)}")
    summary: dict[str, Any] = {"num_volumes": len(per_volume)}
    for name, value in per_volume[0].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            summary[name] = value
        else:
            summary[name] = float(median(float(p[name]) for p in per_volume))
    return summary


def preprocessing_description(
    data_config: DataConfig, stats: Mapping[str, Any] | None = None, downsampling_factor: int | None = None
) -> dict[str, Any]:
    """What goes into an exported model's ``config.json["preprocessing"]``.

    ``stats``: ``summarize_intensity`` over the training volumes; needed for the per-volume presets
    so that ``invert_intensity(x, description["intensity"])`` works for generated volumes.
    """
    ic = data_config.intensity
    intensity: dict[str, Any] = {"preset": ic.preset}
    if ic.preset == "ct_window":
        intensity.update(a_min=ic.window_min, a_max=ic.window_max, b_min=0.0, b_max=1.0, clip=ic.clip)
    elif ic.preset == "mri_percentile":
        intensity.update(lower_percentile=ic.lower_percentile, upper_percentile=ic.upper_percentile,
                         b_min=0.0, b_max=1.0, clip=ic.clip)
    elif ic.preset == "zscore":
        intensity.update(foreground_threshold=ic.foreground_threshold)
    if ic.preset in PER_VOLUME_PRESETS:
        intensity["per_volume"] = True  # each input is scaled by its own parameters; these are medians
        if stats is not None:
            if stats.get("preset") != ic.preset:
                raise ValueError(f"intensity stats are for preset {stats.get('preset')!r}, config says {ic.preset!r}")
            intensity.update({k: v for k, v in stats.items() if k != "preset"})
    return {
        "modality": data_config.modality,
        "units": "HU" if data_config.modality == "CT" else "arbitrary",
        "orientation": data_config.orientation,
        "spacing": None if data_config.spacing is None else [float(s) for s in data_config.spacing],
        "intensity": intensity,
        "pad_to_multiple_of": downsampling_factor,
    }
