"""MONAI dictionary-transform pipelines, one per phase, in the order of an acquisition protocol.

    load (NIfTI / DICOM, medvae.io)        image: (I, J, K) in the file's units and grid
    channel first                          image: (1, I, J, K)
    orientation -> data.orientation (RAS)  axes permuted/flipped, no interpolation
    spacing -> data.spacing (if set)       trilinear resampling to the target voxel size in mm
    intensity preset                       HU / scanner units -> network scale; parameters in meta["intensity"]
    pad to a multiple of the factor        DivisiblePad: to the next multiple only, never more
    train only:
      pad up to data.patch_size            volumes smaller than a patch
      random crop of data.patch_size       (1, D, H, W) with D, H, W = patch_size
      augmentations                        left-right flip (off by default), small intensity scale and shift,
                                           Gaussian noise (off by default)

Padding uses the volume's lowest normalised value (air or background), not 0: after a z-score 0 is
the foreground mean, and padding with tissue-like values would teach the model false edges.

Left-right flips are off by default (``data.augment.flip_prob = 0``): brains are not mirror
symmetric (language lateralisation, petalia) and a model of real anatomy should not learn mirror
images. Turn them on for data where handedness carries no meaning.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    DivisiblePad,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Padd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    SpatialPad,
    Spacingd,
)

from medvae.config import DataConfig
from medvae.data.intensity import intensity_transform
from medvae.data.load import LoadVolumed

PHASES = ("train", "val", "infer")
KEY = "image"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # medvae affines map voxels to RAS+ mm (nibabel's convention)


BAD_INPUT_ERRORS = (ValueError, OSError)  # what a bad file raises (medvae.io.VolumeError is a ValueError)


def root_cause(err: BaseException) -> BaseException:
    """MONAI wraps a transform's error in RuntimeError("applying transform ..."); find the original."""
    while isinstance(err, RuntimeError) and err.__cause__ is not None:
        err = err.__cause__
    return err


class Pipeline(Compose):
    """MONAI ``Compose`` that lets a bad input's own one-line error (ValueError or OSError naming the
    file) through, instead of MONAI's RuntimeError("applying transform ...") wrapped around it."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy: bool | None = None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as err:
            cause = root_cause(err)
            if isinstance(cause, BAD_INPUT_ERRORS):
                raise cause from None
            raise


class PadWithMinimumd(Padd):
    """``Padd`` whose constant is the image's own minimum (its background after normalisation).

    Invertible like ``Padd``: ``inverse`` crops the padding off again.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.padder(d[key], mode=mode, value=float(torch.as_tensor(d[key]).min()))
        return d


def check_patch_size(patch_size: list[int] | tuple[int, ...], downsampling_factor: int) -> None:
    """Raise ValueError naming data.patch_size unless every side is a multiple of the factor."""
    bad = [int(s) for s in patch_size if int(s) % downsampling_factor]
    if bad:
        raise ValueError(
            f"data.patch_size {list(patch_size)}: every side must be a multiple of the model's "
            f"downsampling factor {downsampling_factor}"
        )


def check_spacing(spacing) -> list[float]:
    """data.spacing as three positive, finite millimetre values (ValueError naming the value otherwise)."""
    values = [float(v) for v in spacing]
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"data.spacing {list(spacing)}: need three positive voxel sizes in mm")
    return values


class CheckResampledSized(MapTransform):
    """Before resampling: refuse a target spacing that would make the volume larger than a read may
    allocate (``medvae.io.volume.volume_byte_cap``), naming the file and the size it would have."""

    def __init__(self, keys, spacing: list[float]) -> None:
        super().__init__(keys)
        self.spacing = np.asarray(spacing, dtype=np.float64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medvae.io.volume import check_allocation

        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            extent = np.asarray(image.shape[1:], dtype=np.float64) * np.asarray(image.pixdim, dtype=np.float64)
            shape = np.ceil(extent / self.spacing).astype(np.int64)
            source = image.meta.get("filename_or_obj", key)
            check_allocation(source, int(np.prod(shape, dtype=np.float64)) * 4 * 2,
                             f"resampling to data.spacing {self.spacing.tolist()} mm ({'x'.join(map(str, shape))} voxels)")
        return d


def build_transforms(data_config: DataConfig, phase: str, downsampling_factor: int) -> Pipeline:
    """The pipeline for ``phase`` ("train", "val" or "infer") over items ``{"image": path, "id", "modality"}``.

    Output item: ``image`` (1, D, H, W) float32 MetaTensor (affine in RAS mm; meta keeps
    ``filename_or_obj``, ``modality``, ``units``, ``intensity``), plus ``id``, ``modality``, ``path``.
    train: D, H, W = data.patch_size. val/infer: the whole volume padded to the next multiple of
    ``downsampling_factor``. val and infer are deterministic and invertible (``restore_geometry``).
    A bad file raises its reader's one-line ValueError (``medvae.io.VolumeError``) naming the file.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if downsampling_factor < 1:
        raise ValueError(f"downsampling_factor must be >= 1, got {downsampling_factor}")
    transforms: list = [
        LoadVolumed(KEY, series=data_config.dicom_series, frame=data_config.frame, nonfinite=data_config.nonfinite),
        EnsureChannelFirstd(KEY, channel_dim="no_channel"),
        Orientationd(KEY, axcodes=data_config.orientation, labels=RAS_LABELS),
    ]
    if data_config.spacing is not None:
        target = check_spacing(data_config.spacing)
        transforms += [CheckResampledSized(KEY, target), Spacingd(KEY, pixdim=target, mode="bilinear")]
    transforms += [
        intensity_transform(data_config.intensity, KEY),
        PadWithMinimumd(KEY, padder=DivisiblePad(k=downsampling_factor)),
    ]
    if phase == "train":
        check_patch_size(data_config.patch_size, downsampling_factor)
        patch = [int(s) for s in data_config.patch_size]
        augment = data_config.augment
        transforms += [
            PadWithMinimumd(KEY, padder=SpatialPad(spatial_size=patch)),
            # crops_per_volume > 1: several crops of one loaded volume, each its own batch item
            # (list_data_collate flattens them); the augmentations below act on each crop.
            RandSpatialCropd(KEY, roi_size=patch, random_size=False) if data_config.crops_per_volume == 1
            else RandSpatialCropSamplesd(KEY, roi_size=patch, num_samples=data_config.crops_per_volume,
                                         random_size=False),
        ]
        if augment.flip_prob > 0:  # axis 0 is left-right after RAS orientation
            transforms.append(RandFlipd(KEY, prob=augment.flip_prob, spatial_axis=0))
        if augment.intensity_scale > 0:  # x * (1 + f), f in [-scale, scale]
            transforms.append(RandScaleIntensityd(KEY, factors=augment.intensity_scale, prob=augment.intensity_prob))
        if augment.intensity_shift > 0:  # x + o, o in [-shift, shift], normalised units
            transforms.append(RandShiftIntensityd(KEY, offsets=augment.intensity_shift, prob=augment.intensity_prob))
        if augment.noise_std > 0:  # std drawn uniformly in [0, noise_std] per crop
            transforms.append(RandGaussianNoised(KEY, prob=augment.intensity_prob, mean=0.0, std=augment.noise_std,
                                                 sample_std=True))
    transforms.append(EnsureTyped(KEY, dtype=torch.float32, track_meta=True))
    return Pipeline(transforms)


def restore_geometry(prediction: torch.Tensor, sample_image: MetaTensor, transform: Compose) -> MetaTensor:
    """Undo padding, spacing and orientation on a network output, back onto the file's voxel grid.

    prediction: (C, D, H, W), the same grid as ``sample_image`` (the output of a val/infer
    ``transform``). Returns (C, I, J, K) whose affine is the file's original affine, exactly.
    Intensities are left as they are: apply ``invert_intensity`` for real units.
    """
    if tuple(prediction.shape[1:]) != tuple(sample_image.shape[1:]):
        raise ValueError(
            f"prediction spatial shape {tuple(prediction.shape[1:])} does not match the sample's "
            f"{tuple(sample_image.shape[1:])}"
        )
    meta = {k: copy.deepcopy(v) for k, v in sample_image.meta.items() if k != "affine"}
    carrier = MetaTensor(torch.as_tensor(prediction).detach().float().cpu(), affine=sample_image.affine.clone(),
                         meta=meta)
    carrier.applied_operations = copy.deepcopy(sample_image.applied_operations)
    restored = transform.inverse({KEY: carrier})[KEY]
    original = np.asarray(sample_image.meta["original_affine"], dtype=np.float64)
    assert np.allclose(np.asarray(restored.affine, dtype=np.float64), original, atol=1e-4), "inverse moved the grid"
    restored.affine = torch.as_tensor(original, dtype=torch.float64)
    return restored
