"""Datalists: which volumes to train and validate on.

An item is ``{"image": path, "id": stable id, "modality": "CT" | "MR"}``. Sources:

- a folder: every NIfTI file under it, and every folder holding DICOM files (one series each;
  a DICOMDIR stands for its folder);
- a glob (``data/*.nii.gz``, ``scans/**/``): the NIfTI files and DICOM folders it matches;
- a CSV with an ``image`` column and optional ``id`` and ``modality`` columns;
- a JSON file, MONAI style: a list of items (or of paths), or ``{"training": [...], "validation": [...]}``;
- ``"demo"``: the built-in real MRI (``medvae.data.demo``).

Relative paths in a CSV or JSON are relative to that file's folder. The id is the row's ``id``, or
the path relative to the source without its suffix (``sub-01/anat/T1w.nii.gz`` -> ``sub-01_anat_T1w``),
so it is the same on every machine. Files are not opened here: a missing or broken file is the
loader's business (it fails, or is skipped with ``data.on_bad_file=skip``).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medvae.config import DataConfig

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MODALITY_NAMES = {"CT": "CT", "MR": "MR", "MRI": "MR"}
Item = dict[str, Any]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR" or path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _id_for(path: Path, root: Path) -> str:
    """Path relative to ``root``, suffix dropped, separators as ``_`` (the root itself: its name)."""
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        relative = Path(path.name)
    parts = list(relative.parts) or [path.resolve().name]
    parts[-1] = _stem(Path(parts[-1]))
    return "_".join(p for p in parts if p) or path.name


def _modality(value: Any, default: str, where: str) -> str:
    if value is None or str(value).strip() == "":
        return default
    name = MODALITY_NAMES.get(str(value).strip().upper())
    if name is None:
        raise ValueError(f"{where}: modality {value!r} is not CT or MR")
    return name


def _scan_folder(folder: Path) -> list[Path]:
    """NIfTI files and DICOM series folders (or DICOMDIR files) under ``folder``, sorted."""
    found: list[Path] = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(current)
        names = sorted(f for f in files if not f.startswith("."))
        if "DICOMDIR" in (n.upper() for n in names):
            found.append(here / next(n for n in names if n.upper() == "DICOMDIR"))
            dirs[:] = []  # the DICOMDIR indexes the series below it
            continue
        found += [here / n for n in names if _is_nifti(here / n)]
        if any(_is_dicom_file(here / n) for n in names if not _is_nifti(here / n)):
            found.append(here)  # one series per folder; read_volume searches it recursively
            dirs[:] = []
    return found


def _items_from_paths(paths: list[Path], root: Path, modality: str) -> list[Item]:
    return [{"image": str(p), "id": _id_for(p, root), "modality": modality} for p in paths]


def _item_from_row(row: Any, base: Path, modality: str, where: str) -> Item:
    if isinstance(row, str):
        row = {"image": row}
    if not isinstance(row, dict) or not str(row.get("image") or "").strip():
        raise ValueError(f"{where}: needs an 'image' path, got {row!r}")
    image = Path(str(row["image"]).strip()).expanduser()
    if not image.is_absolute():
        image = base / image
    item_id = str(row.get("id") or "").strip() or _id_for(image, base)
    return {"image": str(image), "id": item_id, "modality": _modality(row.get("modality"), modality, where)}


def _items_from_rows(rows: list[Any], base: Path, modality: str, where: str) -> list[Item]:
    return [_item_from_row(row, base, modality, f"{where} item {index}") for index, row in enumerate(rows)]


def _read_csv(path: Path, modality: str) -> list[Item]:
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "image" not in [f.strip() for f in reader.fieldnames]:
                raise ValueError(f"{path}: a CSV datalist needs an 'image' column, found {reader.fieldnames}")
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read the CSV datalist ({err})") from None
    # line 1 is the header
    return [_item_from_row(row, path.parent, modality, f"{path} line {line}") for line, row in enumerate(rows, start=2)]


def _read_json(path: Path, modality: str) -> dict[str, list[Item]]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the JSON datalist ({err})") from None
    if isinstance(content, list):
        return {"training": _items_from_rows(content, path.parent, modality, str(path))}
    if isinstance(content, dict) and isinstance(content.get("training"), list):
        parts = {"training": _items_from_rows(content["training"], path.parent, modality, f"{path} training")}
        if isinstance(content.get("validation"), list):
            parts["validation"] = _items_from_rows(content["validation"], path.parent, modality,
                                                   f"{path} validation")
        return parts
    raise ValueError(f"{path}: a JSON datalist is a list of items or {{\"training\": [...], \"validation\": [...]}}")


def read_datalist(source: str, modality: str = "MR", cache_dir: str | os.PathLike | None = None) -> dict[str, list[Item]]:
    """Items of ``source`` as ``{"training": [...]}``, plus ``"validation"`` when the source marks one.

    ``modality`` fills rows that do not say; ``cache_dir`` is where ``"demo"`` is materialised.
    """
    modality = _modality(modality, "MR", "data.modality")
    if source == "demo":
        from medvae.data.demo import demo_datalist

        return _read_json(demo_datalist(cache_dir), modality)
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
        paths = [m for m in matches if _is_nifti(m)] + [p for m in matches if m.is_dir() for p in _scan_folder(m)]
        if not paths:
            raise ValueError(f"{source}: the pattern matches no NIfTI file or DICOM folder")
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
        return {"training": _items_from_paths(sorted(set(paths)), root, modality)}
    if path.is_dir():
        paths = _scan_folder(path)
        if not paths:
            raise ValueError(f"{path}: no NIfTI files or DICOM series found in this folder")
        return {"training": _items_from_paths(paths, path, modality)}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such datalist, folder or file")
    if path.suffix.lower() == ".csv":
        return {"training": _read_csv(path, modality)}
    if path.suffix.lower() == ".json":
        return _read_json(path, modality)
    if _is_nifti(path) or _is_dicom_file(path):
        return {"training": _items_from_paths([path], path.parent, modality)}
    raise ValueError(f"{path}: not a folder, glob, .csv or .json datalist, nor a NIfTI/DICOM file")


def split_datalist(items: list[Item], val_fraction: float, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """Deterministic hold-out: ``round(n * val_fraction)`` items (at least 1 when 0 < fraction and n >= 2).

    Items are ranked by a hash of ``(seed, id)``, so the split does not depend on the input order and
    adding a volume moves few others. Both parts keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) >= 2:
        n_val = min(max(n_val, 1), len(items) - 1)
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{items[i]['id']}".encode()).hexdigest())
    held_out = set(ranked[:n_val])
    train = [item for i, item in enumerate(items) if i not in held_out]
    val = [item for i, item in enumerate(items) if i in held_out]
    return train, val


def _check_unique_ids(items: list[Item], where: str) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item["id"] in seen:
            raise ValueError(f"{where}: id {item['id']!r} is used by both {seen[item['id']]} and {item['image']}")
        seen[item["id"]] = item["image"]


def resolve_datalists(data_config: DataConfig, seed: int = 0,
                      cache_dir: str | os.PathLike | None = None) -> tuple[list[Item], list[Item]]:
    """(train items, val items) for ``data_config``.

    Validation comes from ``data.val`` if set, else from the source's own ``validation`` part (the
    demo has one), else a seeded hold-out of ``data.val_fraction`` of the training items.
    """
    parts = read_datalist(data_config.train, data_config.modality, cache_dir)
    train = parts["training"]
    if data_config.val is not None:
        val_parts = read_datalist(data_config.val, data_config.modality, cache_dir)
        val = val_parts.get("validation", val_parts["training"])
    elif "validation" in parts:
        val = parts["validation"]
    else:
        train, val = split_datalist(train, data_config.val_fraction, seed)
    overlap = {i["image"] for i in train} & {i["image"] for i in val}
    if overlap:
        raise ValueError(f"data.val: {sorted(overlap)[0]} is in both the training and the validation list")
    _check_unique_ids(train + val, f"data.train={data_config.train!r}")
    return train, val
