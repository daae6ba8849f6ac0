"""The first transform of every pipeline: a file (NIfTI or DICOM) -> MetaTensor with its geometry.

Reading goes through ``medvae.io.read_volume``, so every reader check (NaN voxels, 2D, 4D without a
frame, constant volumes, broken DICOM series) applies and its one-line error names the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medvae.io import Volume, read_volume


def volume_to_metatensor(volume: Volume, modality: str | None = None) -> MetaTensor:
    """(I, J, K) Volume -> (I, J, K) MetaTensor whose affine is the volume's voxel -> RAS mm affine.

    Meta keeps what MONAI's readers keep (``affine``, ``original_affine``, ``spatial_shape``,
    ``filename_or_obj``, ``space``) and what medvae needs later: ``modality`` and ``units``
    (strings, so batches collate).
    """
    affine = np.asarray(volume.affine, dtype=np.float64)
    meta = {
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(volume.shape, dtype=np.int64),
        "filename_or_obj": volume.source,
        "original_channel_dim": "no_channel",
        "space": "RAS",
        "modality": modality or volume.modality or "unknown",
        "units": volume.units or "unknown",
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32)),
                      affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


class LoadVolumed(MapTransform):
    """Read ``data[key]`` (a path, or an already read ``Volume``) into a MetaTensor.

    Also sets ``data["path"]`` (the file read) and checks the datalist's ``data["modality"]``
    against the file's own DICOM Modality: a CT series listed as MR (or the reverse) is refused,
    because it would get the other modality's intensity preset.
    """

    def __init__(self, keys: KeysCollection = "image", *, series: str | None = None, frame: int | None = None,
                 nonfinite: str = "reject") -> None:
        super().__init__(keys)
        if nonfinite not in ("reject", "repair"):
            raise ValueError(f"nonfinite must be 'reject' or 'repair', got {nonfinite!r}")
        self.series, self.frame, self.nonfinite = series, frame, nonfinite

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, Volume):
                volume = value
            else:
                volume = read_volume(str(value), series=self.series, frame=self.frame, nonfinite=self.nonfinite)
            listed = d.get("modality")
            if listed and volume.modality in ("CT", "MR") and volume.modality != listed:
                raise ValueError(
                    f"{volume.source}: the file says modality {volume.modality} but the datalist or data.modality "
                    f"says {listed}; set the row's modality or data.modality={volume.modality}"
                )
            d[key] = volume_to_metatensor(volume, modality=listed)
            d.setdefault("path", volume.source if isinstance(value, Volume) else str(value))
        return d
