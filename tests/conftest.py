"""Shared pytest fixtures. Each feature keeps its fixtures in its own marked section."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------------------------
# medvae.io fixtures: real volumes that ship inside installed packages (nibabel, pydicom,
# pydicom-data); nothing is downloaded. Copies go to tmp_path so tests may damage them.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    """nibabel's test data folder (anatomical.nii, example4d.nii.gz, functional.nii)."""
    return Path(str(importlib.resources.files("nibabel") / "tests" / "data"))


def _dicomdir_folder(name: str) -> Path:
    from pydicom.data import get_testdata_files

    files = get_testdata_files(f"dicomdirtests/*/{name}/*")
    assert files, f"pydicom test data {name} not found"
    return Path(files[0]).parent


@pytest.fixture(scope="session")
def ct5n_folder() -> Path:
    """5 contiguous CT slices, 16x16, 2.5 mm apart, intercept -1024, files not in slice order."""
    return _dicomdir_folder("CT5N")


@pytest.fixture(scope="session")
def ct2_folder() -> Path:
    """4 CT slices with a 202.5 mm gap between the first and second."""
    return _dicomdir_folder("CT2")


@pytest.fixture(scope="session")
def mr2_folder() -> Path:
    """MR scouts: 3 series, two of them with slices in three orientations."""
    return _dicomdir_folder("MR2")


@pytest.fixture(scope="session")
def dicomdir_file() -> Path:
    from pydicom.data import get_testdata_files

    return Path(get_testdata_files("dicomdirtests/DICOMDIR")[0])


@pytest.fixture(scope="session")
def dicom_file():
    """``dicom_file("CT_small.dcm")`` -> path of a pydicom / pydicom-data test file."""
    from pydicom.data import get_testdata_file

    def find(name: str) -> Path:
        path = get_testdata_file(name)
        assert path is not None, f"pydicom test file {name} not found (is pydicom-data installed?)"
        return Path(path)

    return find


@pytest.fixture
def ct5n_copy(ct5n_folder, tmp_path) -> Path:
    """A writable copy of the CT5N series."""
    return Path(shutil.copytree(ct5n_folder, tmp_path / "CT5N"))


# ---------------------------------------- end of medvae.io fixtures ----------------------------
