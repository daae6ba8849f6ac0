"""``medvae generate``: decode latent samples into synthetic scans in real units (HU for CT).

    medvae generate --model runs/x --num 8 --out synth/ [--seed 0] [--temperature 1]
                    [--prior fitted|standard|diffusion] [--shape D H W] [--format nifti|dicom]
                    [--prior-dir P] [--sampler rflow|ddpm|ddim] [--sampling-steps N] [--guidance W]
                    [--condition key=value ...]

``--prior diffusion`` samples the latent diffusion prior that ``medvae train-prior`` trained for
this VAE (``medvae.prior.sampling``; its grid fixes the output shape; the options after
``--prior-dir`` are its own) and runs the copy check: generation.json records the sampler, its
steps, the guidance, the conditions and the fraction of samples flagged as near-copies of a
training volume.

``--prior fitted`` runs the same copy check against the training latents the export keeps with its
fitted prior (``prior_copy_reference.safetensors``, threshold set by the validation volumes at
export) and records ``copy_check`` and ``flagged_copy_fraction`` alike; an export without that
reference (older, or with the file deleted before sharing) still generates, and its ``copy_check``
says why it was not run. Either prior prints one line with the flagged fraction.

Latents come from the export's fitted prior (``medvae.prior``; its grid fixes the output shape) or
from N(0, I) over a grid of ``--shape / factor``. ``--temperature`` scales the prior's std. Sample i
depends only on the seed and i (not on --num). Each latent is decoded by the memory-bounded
decoder, clipped to the normalised range the model was trained on (e.g. [0, 1] for a clipped CT
window, so CT stays inside its HU window) and mapped back to real units with the training set's
intensity parameters.

Geometry: voxels at the training spacing: ``data.spacing`` when training resampled to it, else the
median voxel size of the training volumes that the export records (1 mm only for exports that
record neither; generation.json says which), axes in the training orientation (RAS: i left->right, j
posterior->anterior, k inferior->superior), and the origin placed so the volume's centre is at
world (0, 0, 0) mm.

The output folder (new or empty) appears complete or not at all: ``sample_000.nii.gz`` (or a DICOM
series folder ``sample_000/``) and ``sample_000.png`` (tri-planar preview) per scan,
``montage.png`` (axial mid-slices of all scans) and ``generation.json`` (seed, temperature, prior,
model hash, shape, affine, units, files).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from medvae.jobs.loading import (
    LoadedModel,
    check_output_folder,
    load_for_inference,
    new_output_folder,
    to_real_units,
)

WORLD_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
DEFAULT_SPACING_MM = 1.0  # only for exports that record no training spacing at all
MONTAGE_MAX = 64  # scans shown in montage.png
MAX_SAMPLES = 100_000  # --num bound: sample names have room for it, and each scan is a file


def centred_affine(shape: tuple[int, int, int], spacing: list[float], orientation: str = "RAS") -> np.ndarray:
    """4x4 voxel -> RAS+ mm affine: axes along ``orientation`` codes, the grid's centre at (0, 0, 0) mm."""
    if len(orientation) != 3 or {WORLD_AXIS[c][0] for c in orientation.upper() if c in WORLD_AXIS} != {0, 1, 2}:
        raise ValueError(f"orientation {orientation!r} is not a 3-letter axis code like RAS or LPS")
    affine = np.eye(4)
    for axis, (code, step) in enumerate(zip(orientation.upper(), spacing)):
        world, sign = WORLD_AXIS[code]
        affine[:3, axis] = 0.0
        affine[world, axis] = sign * float(step)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return affine


def output_spacing(preprocessing: dict) -> tuple[list[float], str]:
    """(voxel size in mm along D, H, W, where it came from) for generated volumes."""
    if preprocessing.get("spacing") is not None:
        return [float(s) for s in preprocessing["spacing"]], "training spacing (data.spacing)"
    if preprocessing.get("median_training_spacing") is not None:
        return ([float(s) for s in preprocessing["median_training_spacing"]],
                "median voxel size of the training volumes (trained at each file's own spacing)")
    return [DEFAULT_SPACING_MM] * 3, "assumed: the export records no training spacing"


def _check_shape(shape, factor: int) -> tuple[int, int, int]:
    values = tuple(int(s) for s in shape)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"--shape {' '.join(map(str, values))}: need three positive sizes D H W")
    if any(s % factor for s in values):
        raise ValueError(f"--shape {' '.join(map(str, values))}: every side must be a multiple of the model's "
                         f"downsampling factor {factor}")
    from medvae.io.volume import check_allocation

    check_allocation(f"--shape {' '.join(map(str, values))}", math.prod(values) * 4 * 2, "a float32 volume this size")
    return values  # type: ignore[return-value]


def _choose_prior(loaded: LoadedModel, prior: str, shape):
    """(LatentPrior, volume shape) for ``--prior`` and ``--shape``."""
    from medvae.prior import LatentPrior, load_prior

    fitted = load_prior(loaded.directory)
    factor = loaded.factor
    if prior == "fitted":
        if fitted is None:
            raise ValueError(f"{loaded.directory}: this model has no fitted prior (no prior.safetensors); "
                             "use --prior standard, or export it from a training run that fits one")
        prior_shape = tuple(s * factor for s in fitted.latent_shape[1:])
        if shape is not None and _check_shape(shape, factor) != prior_shape:
            raise ValueError(f"--shape {' '.join(map(str, shape))}: the fitted prior makes volumes of "
                             f"{' '.join(map(str, prior_shape))} voxels only; drop --shape or use --prior standard")
        return fitted, prior_shape
    if prior != "standard":
        raise ValueError(f"--prior {prior!r}: use 'fitted' or 'standard'")
    if shape is None:
        trained_patch = ((loaded.config.get("extra") or {}).get("trained_with") or {}).get("data", {}).get("patch_size")
        if fitted is not None:
            shape = [s * factor for s in fitted.latent_shape[1:]]
        elif trained_patch:
            shape = trained_patch
        else:
            raise ValueError(f"{loaded.directory}: the model records no training shape; give --shape D H W")
    volume_shape = _check_shape(shape, factor)
    latent_shape = (loaded.model.arch.latent_channels, *(s // factor for s in volume_shape))
    return LatentPrior.standard(latent_shape), volume_shape


def write_montage(volumes: list[np.ndarray], labels: list[str], path: Path) -> Path:
    """Axial mid-slices of (D, H, W) volumes in a near-square grid, one shared intensity window (PNG)."""
    from PIL import Image, ImageDraw

    from medvae.atomic import atomic_file
    from medvae.tracking.preview import GAP, LABEL_HEIGHT, WINDOW_PERCENTILES, mid_slices, readable_scale

    slices = [mid_slices(v)[0] for v in volumes[:MONTAGE_MAX]]
    low, high = np.percentile(np.concatenate([s.ravel() for s in slices]), WINDOW_PERCENTILES)
    high = high if high > low else low + 1.0
    scale = readable_scale(slices[0].shape)  # small volumes: each voxel drawn as scale x scale pixels
    rows_px, cols_px = (side * scale for side in slices[0].shape)
    columns = math.ceil(math.sqrt(len(slices)))
    rows = math.ceil(len(slices) / columns)
    canvas = Image.new("L", (GAP + columns * (cols_px + GAP), GAP + rows * (LABEL_HEIGHT + rows_px + GAP)), 0)
    draw = ImageDraw.Draw(canvas)
    for index, (plane, label) in enumerate(zip(slices, labels)):
        left = GAP + (index % columns) * (cols_px + GAP)
        top = GAP + (index // columns) * (LABEL_HEIGHT + rows_px + GAP)
        pixels = (np.clip((plane - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
        draw.text((left, top), label, fill=255)
        tile = Image.fromarray(np.ascontiguousarray(pixels))
        canvas.paste(tile.resize((cols_px, rows_px), Image.NEAREST), (left, top + LABEL_HEIGHT))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def generate(model_dir: str | os.PathLike, num: int, out_dir: str | os.PathLike, seed: int = 0,
             temperature: float = 1.0, shape=None, prior: str = "fitted", out_format: str = "nifti",
             memory_budget: int | None = None, diffusion: dict | None = None) -> Path:
    """Write ``num`` synthetic scans into the new folder ``out_dir``; return it (see the module doc).

    ``diffusion``: keyword arguments of ``medvae.prior.sampling.sample_diffusion_latents`` (prior_dir,
    sampler, sampling_steps, guidance, conditions) for ``prior="diffusion"``.
    """
    from medvae.io import Volume, write_volume
    from medvae.tracking.preview import readable_scale, triplanar_preview

    if out_format not in ("nifti", "dicom"):
        raise ValueError(f"--format {out_format!r}: use 'nifti' or 'dicom'")
    if not 1 <= num <= MAX_SAMPLES or not temperature >= 0:
        raise ValueError(f"--num must be in 1..{MAX_SAMPLES} and --temperature >= 0, got {num} and {temperature}")
    check_output_folder(out_dir)  # before any model is loaded or latent sampled
    loaded = load_for_inference(model_dir, memory_budget=memory_budget)
    if prior == "diffusion":
        from medvae.prior.sampling import sample_diffusion_latents

        latents, volume_shape, prior_record = sample_diffusion_latents(loaded, num, seed, shape, **(diffusion or {}))
    else:
        latent_prior, volume_shape = _choose_prior(loaded, prior, shape)
    preprocessing = loaded.preprocessing
    spacing, spacing_note = output_spacing(preprocessing)
    orientation = str(preprocessing.get("orientation") or "RAS")
    affine = centred_affine(volume_shape, spacing, orientation)
    modality = preprocessing.get("modality")
    units = preprocessing.get("units") or ("HU" if modality == "CT" else None)

    if prior != "diffusion":
        # Streamed: one (C, d, h, w) latent at a time from one generator, the same draws as sample(num).
        generator = torch.Generator().manual_seed(seed)
        latents = (latent_prior.sample(1, generator, temperature)[0] for _ in range(num))
        prior_record = {"prior_description": latent_prior.description, "latent_shape": list(latent_prior.latent_shape)}
        if prior == "fitted":
            latents = _copy_checked(latents, latent_prior, prior_record)
    samples, volumes = [], []
    with new_output_folder(out_dir) as tmp:
        for index, z in enumerate(latents):
            decoded = loaded.decode(z[None])[0, 0]  # (D, H, W) normalised
            array = to_real_units(decoded, preprocessing["intensity"])
            name = f"sample_{index:03d}"
            volume = Volume(array, affine, modality=modality, units="HU" if modality == "CT" else None)
            if out_format == "dicom":
                write_volume(volume, tmp / name, format="dicom", series_number=index + 1,
                             series_description=f"medvae synthetic {prior} prior seed {seed} #{index}")
                file = name
            else:
                file = f"{name}.nii.gz"
                write_volume(volume, tmp / file)
            triplanar_preview([array], [f"{name} ({prior} prior)"], tmp / f"{name}.png",
                              scale=readable_scale(array.shape))
            samples.append({"index": index, "file": file, "preview": f"{name}.png",
                            "min": float(array.min()), "max": float(array.max())})
            if index < MONTAGE_MAX:  # only what the montage shows stays in memory
                volumes.append(array)
        write_montage(volumes, [s["file"] for s in samples], tmp / "montage.png")
        check = prior_record.get("copy_check") or {}
        if check.get("checked"):  # each sample's own verdict, beside its file
            for sample, flagged, distance in zip(samples, check["flagged"], check["nearest_training_distance"]):
                sample.update(flagged_copy=flagged, nearest_training_distance=distance)
        record = {
            "command": "generate", "model": str(loaded.directory), "model_hash": loaded.hash,
            "num": num, "seed": seed, "temperature": temperature,
            "prior": prior, **prior_record, "shape": list(volume_shape),
            "spacing_mm": [float(s) for s in spacing], "spacing_source": spacing_note,
            "orientation": orientation, "affine": affine.tolist(),
            "origin": "volume centre at world (0, 0, 0) mm", "format": out_format,
            "modality": modality, "units": units, "intensity": preprocessing["intensity"], "samples": samples,
        }
        (tmp / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
    if "copy_check" in record:
        from medvae.prior.sampling import copy_check_line

        print(copy_check_line(record), flush=True)
    return Path(out_dir)


def _copy_checked(latents, latent_prior, prior_record: dict):
    """Pass the fitted prior's latents through, measuring each one's nearest-training distance; when
    the stream ends, ``prior_record`` gets ``copy_check`` and ``flagged_copy_fraction``."""
    from medvae.prior.gaussian import COPY_REFERENCE_NAME
    from medvae.prior.quality import nearest_distances
    from medvae.prior.sampling import copy_check_record

    reference = latent_prior.copy_reference
    settings = latent_prior.description.get("copy_check") or {}
    distances = []
    for z in latents:
        if reference is not None:
            distances.append(float(nearest_distances(z[None], reference)[0]))
        yield z
    if reference is not None:
        prior_record.update(copy_check_record(distances, settings))
    else:
        reason = settings.get("reason") or (
            f"the export's copy reference {COPY_REFERENCE_NAME} is missing" if "threshold" in settings
            else "the export has no copy reference (its prior was fitted before copy checks were stored)")
        prior_record.update(copy_check_record(None, reason=reason))
