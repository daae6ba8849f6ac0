"""The embeddings file of ``medvae embed``: one row per volume, as Parquet, NPZ or CSV (by suffix).

Columns (every format):

    id                 the volume's id (file name without suffix, or the datalist's id column)
    path               the file or DICOM folder read
    embedding          float32 (C,): the latent mean averaged over the whole grid, per channel
    spatial_embedding  float32 (C * N^3,), channel-major: the latent mean pooled to an N^3 grid
                       (only with --spatial-pool N)
    latent_shape       (C, d, h, w) of the latent grid
    latent_file        the latent grid's NIfTI file ("" without --latents-dir)
    sampled            true if a posterior sample was embedded instead of the mean (--sample)
    model_hash         sha256 of the model's weights
    preprocessing      the model's preprocessing, as JSON

Parquet keeps vectors as list<float32> columns; NPZ as (N, C) arrays (strings as unicode arrays, so
``np.load(allow_pickle=False)`` works); CSV as one column per number (``embedding_0`` ...), written
with 9 significant digits so float32 values read back exactly, and latent_shape as ``CxDxHxW``.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medvae.atomic import atomic_file

FORMATS = {".parquet": "parquet", ".npz": "npz", ".csv": "csv"}
TEXT_COLUMNS = ("id", "path", "latent_file", "model_hash", "preprocessing")
Row = dict[str, Any]


def table_format(path: str | os.PathLike) -> str:
    """'parquet', 'npz' or 'csv' from the suffix; ValueError naming the path otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: the output must end in .parquet, .npz or .csv, not {suffix or 'no suffix'!r}")
    if FORMATS[suffix] == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(f"{path}: Parquet needs pyarrow (pip install 'medvae3d[parquet]'), "
                             "or write .npz or .csv instead") from None
    return FORMATS[suffix]


def _has_spatial(rows: list[Row]) -> bool:
    return bool(rows) and rows[0].get("spatial_embedding") is not None


def write_table(rows: list[Row], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts with the columns above) to ``path`` atomically, in the suffix's format."""
    path = Path(path)
    kind = table_format(path)
    with atomic_file(path) as tmp:
        {"parquet": _write_parquet, "npz": _write_npz, "csv": _write_csv}[kind](rows, tmp)
    return path


def read_table(path: str | os.PathLike) -> list[Row]:
    """Rows of an embeddings file written by ``write_table`` (vectors as float32 arrays)."""
    path = Path(path)
    kind = table_format(path)
    try:
        return {"parquet": _read_parquet, "npz": _read_npz, "csv": _read_csv}[kind](path)
    except (OSError, KeyError, ValueError, IndexError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read it as an embeddings file ({' '.join(str(err).split())}); "
                         "move it away or choose another --out") from None


def _write_parquet(rows: list[Row], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: pa.array([r[name] for r in rows], type=pa.string()) for name in TEXT_COLUMNS}
    columns["embedding"] = pa.array([np.asarray(r["embedding"], np.float32) for r in rows], type=pa.list_(pa.float32()))
    if _has_spatial(rows):
        columns["spatial_embedding"] = pa.array([np.asarray(r["spatial_embedding"], np.float32) for r in rows],
                                                type=pa.list_(pa.float32()))
    columns["latent_shape"] = pa.array([list(map(int, r["latent_shape"])) for r in rows], type=pa.list_(pa.int64()))
    columns["sampled"] = pa.array([bool(r["sampled"]) for r in rows], type=pa.bool_())
    pq.write_table(pa.table(columns), path)


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["embedding"] = np.asarray(row["embedding"], dtype=np.float32)
        row["spatial_embedding"] = (None if row.get("spatial_embedding") is None
                                    else np.asarray(row["spatial_embedding"], dtype=np.float32))
        row["latent_shape"] = [int(s) for s in row["latent_shape"]]
    return rows


def _write_npz(rows: list[Row], path: Path) -> None:
    arrays = {name: np.asarray([r[name] for r in rows], dtype=np.str_) for name in TEXT_COLUMNS}
    arrays["embedding"] = np.stack([np.asarray(r["embedding"], np.float32) for r in rows])
    if _has_spatial(rows):
        arrays["spatial_embedding"] = np.stack([np.asarray(r["spatial_embedding"], np.float32) for r in rows])
    arrays["latent_shape"] = np.asarray([r["latent_shape"] for r in rows], dtype=np.int64)
    arrays["sampled"] = np.asarray([bool(r["sampled"]) for r in rows])
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _read_npz(path: Path) -> list[Row]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    rows = []
    for i in range(len(arrays["id"])):
        row = {name: str(arrays[name][i]) for name in TEXT_COLUMNS}
        row["embedding"] = arrays["embedding"][i].astype(np.float32)
        spatial = arrays.get("spatial_embedding")
        row["spatial_embedding"] = None if spatial is None else spatial[i].astype(np.float32)
        row["latent_shape"] = [int(s) for s in arrays["latent_shape"][i]]
        row["sampled"] = bool(arrays["sampled"][i])
        rows.append(row)
    return rows


def _write_csv(rows: list[Row], path: Path) -> None:
    width = len(rows[0]["embedding"]) if rows else 0
    spatial = len(rows[0]["spatial_embedding"]) if _has_spatial(rows) else 0
    header = ["id", "path", "latent_shape", "latent_file", "sampled", "model_hash", "preprocessing"]
    header += [f"embedding_{i}" for i in range(width)] + [f"spatial_{i}" for i in range(spatial)]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            numbers = list(r["embedding"]) + (list(r["spatial_embedding"]) if spatial else [])
            writer.writerow([r["id"], r["path"], "x".join(map(str, r["latent_shape"])), r["latent_file"],
                             str(bool(r["sampled"])).lower(), r["model_hash"], r["preprocessing"]]
                            + [format(float(v), ".9g") for v in numbers])


def _read_csv(path: Path) -> list[Row]:
    with open(path, newline="") as fh:
        records = list(csv.DictReader(fh))
    rows = []
    for record in records:
        embedding = [k for k in record if k.startswith("embedding_")]
        spatial = [k for k in record if k.startswith("spatial_")]
        rows.append({
            **{name: record[name] for name in TEXT_COLUMNS},
            "embedding": np.asarray([float(record[k]) for k in embedding], dtype=np.float32),
            "spatial_embedding": np.asarray([float(record[k]) for k in spatial], dtype=np.float32) if spatial else None,
            "latent_shape": [int(s) for s in record["latent_shape"].split("x")],
            "sampled": record["sampled"] == "true",
        })
    return rows
