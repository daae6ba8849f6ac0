"""Rebuild the data settings of a trained model from its export, so new volumes get the same pipeline.

An export's ``config.json["preprocessing"]`` (written by ``preprocessing_description``) says how the
training volumes were prepared: modality, orientation, target spacing and the intensity preset.
``data_config_from_preprocessing`` turns it back into a ``DataConfig`` for ``build_transforms``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medvae.config import DataConfig, IntensityConfig


def data_config_from_preprocessing(preprocessing: Mapping[str, Any] | None, where: str = "model") -> DataConfig:
    """A ``DataConfig`` whose infer pipeline prepares volumes as the model's training volumes were.

    ``where`` names the export in error messages. Per-volume presets (mri_percentile, zscore) are
    measured on each new volume again, as in training; only their settings come from the export.
    """
    if not isinstance(preprocessing, Mapping) or not isinstance(preprocessing.get("intensity"), Mapping):
        raise ValueError(f"{where}: the export has no preprocessing description (config.json 'preprocessing')")
    intensity = preprocessing["intensity"]
    preset = intensity.get("preset")
    settings: dict[str, Any] = {"preset": preset}
    if preset == "ct_window":
        settings.update(window_min=float(intensity["a_min"]), window_max=float(intensity["a_max"]),
                        clip=bool(intensity.get("clip", True)))
    elif preset == "mri_percentile":
        settings.update(lower_percentile=float(intensity["lower_percentile"]),
                        upper_percentile=float(intensity["upper_percentile"]), clip=bool(intensity.get("clip", True)))
    elif preset == "zscore":
        settings.update(foreground_threshold=float(intensity.get("foreground_threshold", 0.0)))
    try:
        spacing = preprocessing.get("spacing")
        return DataConfig(
            modality=str(preprocessing.get("modality", "MR")),
            orientation=str(preprocessing.get("orientation", "RAS")),
            spacing=None if spacing is None else [float(s) for s in spacing],
            intensity=IntensityConfig(**settings),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: unusable preprocessing description ({err})") from None
