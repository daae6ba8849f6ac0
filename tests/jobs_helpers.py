"""Shared pieces of the job tests (generate, embed, reconstruct, evaluate): a tiny export, phantoms, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medvae import VAE3D, save_model
from medvae.config import DataConfig, IntensityConfig
from medvae.data import preprocessing_description
from phantoms import phantom

CT_SPACING = [2.0, 2.0, 2.0]


def tiny_model(seed: int = 0) -> VAE3D:
    """VAE3D(channels=[8, 16]) (factor 2) with every weight perturbed, so its latents carry the input."""
    torch.manual_seed(seed)
    model = VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def ct_preprocessing(spacing=CT_SPACING) -> dict:
    config = DataConfig(modality="CT", spacing=spacing, intensity=IntensityConfig(preset="ct_window"))
    return preprocessing_description(config, downsampling_factor=2)


def mr_preprocessing() -> dict:
    config = DataConfig(modality="MR", spacing=None, intensity=IntensityConfig(preset="mri_percentile"))
    stats = {"preset": "mri_percentile", "lower_percentile": 0.5, "upper_percentile": 99.5, "a_min": 10.0,
             "a_max": 900.0, "b_min": 0.0, "b_max": 1.0, "clip": True, "num_volumes": 3}
    return preprocessing_description(config, stats, downsampling_factor=2)


def make_export(path: Path, preprocessing: dict | None = None, patch_size=(16, 16, 16), seed: int = 0) -> Path:
    """A tiny CT export (ct_window, 2 mm) at ``path``, made without training."""
    extra = {"trained_with": {"data": {"patch_size": list(patch_size)}}}
    return save_model(tiny_model(seed), path, preprocessing=preprocessing or ct_preprocessing(), extra=extra)


def write_ct_phantoms(folder: Path, count: int = 3, shape=(18, 20, 17), spacing: float = 2.0) -> list[Path]:
    """CT-like phantoms in HU (about -1000..1000) as NIfTI, sizes not multiples of the factor."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"ct_{i:02d}.nii.gz"
        image = nib.Nifti1Image(phantom(shape, seed=i, scale=2000.0, offset=-1000.0),
                                np.diag([spacing, spacing, spacing, 1.0]))
        image.header["descrip"] = b"medvae modality=CT units=HU"
        nib.save(image, path)
        paths.append(path)
    return paths


def run_cli(*args, cwd: Path | None = None, launcher: list[str] | None = None, timeout: int = 300):
    """Run ``python -m medvae ARGS`` (optionally under a launcher) in a fresh, single-threaded process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MEDVAE_DEBUG", None)
    command = (launcher or [sys.executable]) + ["-m", "medvae", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *needles: str) -> None:
    """Non-zero exit and exactly one stderr line, 'medvae CMD: error: ...', holding every needle.

    ``result``: a ``subprocess.CompletedProcess`` or a click ``CliRunner`` result.
    """
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code not in (0, None), result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
