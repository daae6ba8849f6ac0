"""Datalists, MONAI transform pipelines, intensity presets and datasets: files -> training tensors.

Start at ``build_datasets`` (training) or ``build_transforms`` (one phase's pipeline); the
intensity presets and their exact inverse live in ``medvae.data.intensity``.
"""

from medvae.data.datalist import read_datalist, resolve_datalists, split_datalist
from medvae.data.dataset import build_datasets
from medvae.data.intensity import invert_intensity, preprocessing_description, summarize_intensity
from medvae.data.transforms import build_transforms, restore_geometry

__all__ = [
    "build_datasets",
    "build_transforms",
    "invert_intensity",
    "preprocessing_description",
    "read_datalist",
    "resolve_datalists",
    "restore_geometry",
    "split_datalist",
    "summarize_intensity",
]
