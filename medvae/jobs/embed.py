"""``medvae embed``: deterministic embeddings (posterior means) of volumes, one row per volume.

    medvae embed --model runs/x --out emb.parquet [--spatial-pool 2] [--latents-dir lat/] [--scatter pca.png]
                 scans/ more.nii.gz list.csv
    accelerate launch --multi_gpu --num_processes 2 -m medvae embed ...   (same file, shards in parallel)

Each volume goes through the model's infer pipeline and the memory-bounded encoder; its embedding is
the posterior MEAN averaged over the latent grid per channel (``--spatial-pool N`` adds the mean
pooled to an N^3 grid). ``--sample`` embeds a posterior sample instead, seeded by ``--seed`` and the
volume's id. Volumes are encoded one at a time, so a vector never depends on its batch-mates, the
batch size or the number of processes: the same volume gives the same vector every time.
``--batch-size`` is how many volumes each process handles between gathers.

The output (``embedding_table``: Parquet, NPZ or CSV by suffix) is resumable: ids already in it are
skipped, and new rows are appended by rewriting the file atomically every ``flush_every`` volumes
and at the end. ``--latents-dir`` writes each latent grid as NIfTI (d, h, w, C) with the latent-grid
affine: the preprocessed volume's axes scaled by the downsampling factor f, origin at the centre of
latent voxel 0, i.e. the centre of input voxels 0..f-1.

A bad input stops the run with its one-line error; the output file and the latents folder are left
as they were at the last rewrite (latent files written since are removed), never half-written.
Under several processes the inputs are sharded by rank, rows are gathered to the main process, and
only it writes the table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medvae.jobs.embedding_table import Row, read_table, table_format, write_table
from medvae.jobs.loading import Item, LoadedModel, load_for_inference, resolve_inputs

FLUSH_EVERY = 256  # volumes between rewrites of the output file (a resumed run loses at most this many)
MAX_SPATIAL_POOL = 16  # --spatial-pool N gives C * N^3 numbers per volume; larger N would upsample the latent grid


def latent_affine(image_affine: np.ndarray, factor: int) -> np.ndarray:
    """Voxel -> RAS mm affine of the latent grid of a volume whose (padded, preprocessed) affine is given.

    Axes are the image's scaled by ``factor``; latent voxel 0 sits at the centre of input voxels
    0..factor-1, i.e. at image voxel ((f - 1) / 2, (f - 1) / 2, (f - 1) / 2).
    """
    image_affine = np.asarray(image_affine, dtype=np.float64)
    affine = image_affine.copy()
    affine[:3, :3] = image_affine[:3, :3] * factor
    affine[:3, 3] = image_affine[:3, :3] @ np.full(3, (factor - 1) / 2) + image_affine[:3, 3]
    return affine


def _file_name(item_id: str) -> str:
    """A safe NIfTI name for an id (a hash suffix keeps changed names distinct)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)
    if safe != item_id:
        safe += "-" + hashlib.sha256(item_id.encode()).hexdigest()[:8]
    return f"{safe}.nii.gz"


def _write_latent(mean: torch.Tensor, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    from medvae.atomic import atomic_file

    array = np.ascontiguousarray(mean.permute(1, 2, 3, 0).cpu().numpy(), dtype=np.float32)  # (d, h, w, C)
    image = nib.Nifti1Image(array, affine)
    image.header["descrip"] = f"medvae latent mean, {array.shape[3]} channels"[:79]
    image.header.set_xyzt_units("mm")
    with atomic_file(path) as tmp:
        nib.save(image, tmp)


def _seed_for(seed: int, item_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:15], 16)


def embed_one(loaded: LoadedModel, item: Item, *, sample: bool = False, seed: int = 0,
              spatial_pool: int | None = None, latents_dir: Path | None = None) -> Row:
    """The row of one volume (see ``embedding_table``); writes its latent NIfTI if ``latents_dir``."""
    image = loaded.prepare(item)  # (1, D, H, W)
    posterior = loaded.encode(image)  # over (1, C, d, h, w)
    if sample:
        generator = torch.Generator(device=posterior.mean.device).manual_seed(_seed_for(seed, item["id"]))
        latent = posterior.sample(generator)
    else:
        latent = posterior.mode()
    latent64 = latent.double()  # pool in float64: the float32 result does not depend on reduction order
    row: Row = {
        "id": item["id"],
        "path": str(Path(item["image"]).resolve()),
        "embedding": latent64.mean(dim=(2, 3, 4))[0].float().cpu().numpy(),
        "spatial_embedding": None,
        "latent_shape": [int(s) for s in latent.shape[1:]],
        "latent_file": "",
        "sampled": bool(sample),
        "model_hash": loaded.hash,
        "preprocessing": json.dumps(loaded.preprocessing, sort_keys=True),
    }
    if spatial_pool:
        if spatial_pool > min(latent.shape[2:]):
            raise ValueError(f"{item['image']}: --spatial-pool {spatial_pool} exceeds its latent grid "
                             f"{'x'.join(map(str, latent.shape[2:]))}; pooling would invent cells")
        pooled = F.adaptive_avg_pool3d(latent64, spatial_pool)[0]  # (C, N, N, N)
        row["spatial_embedding"] = pooled.reshape(-1).float().cpu().numpy()
    if latents_dir is not None:
        path = Path(latents_dir) / _file_name(item["id"])
        _write_latent(latent[0], latent_affine(np.asarray(image.affine), loaded.factor), path)
        row["latent_file"] = str(path)
    return row


def _check_compatible(rows: list[Row], out_file: Path, loaded: LoadedModel, sample: bool,
                      spatial_pool: int | None) -> None:
    """Refuse to append to a file made by another model or with other settings."""
    first = rows[0]
    if first["model_hash"] != loaded.hash:
        raise ValueError(f"{out_file}: holds embeddings of another model (weights {first['model_hash'][:12]}..., "
                         f"now {loaded.hash[:12]}...); choose another --out")
    if bool(first["sampled"]) != bool(sample):
        raise ValueError(f"{out_file}: was written {'with' if first['sampled'] else 'without'} --sample; "
                         "use the same setting or another --out")
    channels = int(first["latent_shape"][0])
    expected = 0 if not spatial_pool else channels * spatial_pool**3
    found = 0 if first.get("spatial_embedding") is None else len(first["spatial_embedding"])
    if found != expected:
        written = round((found / channels) ** (1 / 3)) if found else "none"
        raise ValueError(f"{out_file}: was written with --spatial-pool {written}; use the same or another --out")


def _plan(loaded: LoadedModel, out_file: Path, inputs: list, sample: bool, spatial_pool: int | None
          ) -> tuple[list[Row], list[Item]]:
    """(rows already in the output, items still to embed): run on the main process only."""
    items = resolve_inputs(inputs, loaded.modality)
    existing = read_table(out_file) if out_file.exists() else []
    if existing:
        _check_compatible(existing, out_file, loaded, sample, spatial_pool)
    done = {row["id"] for row in existing}
    return existing, [item for item in items if item["id"] not in done]


def _on_main_then_share(state, function):
    """Run ``function`` on the main process and hand its result (or its user error) to every rank."""
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [None]
    if state.is_main_process:
        try:
            payload = [("ok", function())]
        except (ValueError, OSError) as err:
            payload = [("error", (type(err), str(err)))]
    if state.num_processes > 1:
        broadcast_object_list(payload)
    status, value = payload[0]
    if status == "error":
        kind, message = value
        raise (FileNotFoundError if issubclass(kind, FileNotFoundError) else ValueError)(message)
    return value


def write_pca_scatter(vectors: np.ndarray, labels: list[str], path: str | os.PathLike, size: int = 480) -> Path:
    """PNG scatter of (N, K) vectors on their first two principal components (numpy SVD, Pillow)."""
    from PIL import Image, ImageDraw

    from medvae.atomic import atomic_file

    x = np.asarray(vectors, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    directions = directions[:2]
    directions *= np.sign(directions[np.arange(len(directions)), np.abs(directions).argmax(axis=1)])[:, None]
    coords = np.zeros((len(x), 2))
    coords[:, : len(directions)] = centred @ directions.T
    share = singular**2 / max(float((singular**2).sum()), 1e-30)
    share = np.pad(share, (0, 2))[:2]
    margin = 48
    span = np.ptp(coords, axis=0)
    span[span == 0] = 1.0
    pixels = margin + (coords - coords.min(axis=0)) / span * (size - 2 * margin)
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([margin // 2, margin // 2, size - margin // 2, size - margin // 2], outline="gray")
    for (u, v), label in zip(pixels, labels):
        y = size - v  # PC2 upwards
        draw.ellipse([u - 3, y - 3, u + 3, y + 3], fill="steelblue")
        if len(labels) <= 40:
            draw.text((u + 5, y - 6), label[:24], fill="black")
    draw.text((margin, size - margin // 2 + 4), f"PC1 ({100 * share[0]:.1f}% of variance)", fill="black")
    draw.text((4, 4), f"PC2 ({100 * share[1]:.1f}%)  n={len(labels)}", fill="black")
    path = Path(path)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def embed(model_dir: str | os.PathLike, out_file: str | os.PathLike, inputs: list, sample: bool = False,
          spatial_pool: int | None = None, latents_dir: str | os.PathLike | None = None, batch_size: int = 1,
          scatter: str | os.PathLike | None = None, seed: int = 0, memory_budget: int | None = None,
          flush_every: int = FLUSH_EVERY) -> Path:
    """Embed ``inputs`` into ``out_file`` (see the module doc); return the output path."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    out_file = Path(out_file)
    table_format(out_file)  # a bad suffix fails before any work
    if spatial_pool is not None and not 1 <= spatial_pool <= MAX_SPATIAL_POOL:
        raise ValueError(f"--spatial-pool must be in 1..{MAX_SPATIAL_POOL}, got {spatial_pool}")
    if batch_size < 1 or flush_every < 1:
        raise ValueError(f"--batch-size and flush_every must be >= 1, got {batch_size} and {flush_every}")
    latents = Path(latents_dir) if latents_dir is not None else None
    if latents is not None and latents.exists() and not latents.is_dir():
        raise NotADirectoryError(f"{latents}: --latents-dir is a file, not a folder")

    latents_created = latents is not None and not latents.exists()  # removed again if a bad input stops us
    state = PartialState(cpu=not torch.cuda.is_available())
    loaded = load_for_inference(model_dir, device=state.device, memory_budget=memory_budget)
    existing: list[Row] = []

    def plan_on_main() -> list[Item]:  # the rows already written stay on the main process
        nonlocal existing
        existing, todo = _plan(loaded, out_file, inputs, sample, spatial_pool)
        return todo

    todo = _on_main_then_share(state, plan_on_main)
    rank, world = state.process_index, state.num_processes
    mine = list(range(rank, len(todo), world))  # indices into todo
    steps = math.ceil(math.ceil(len(todo) / world) / batch_size)  # the same on every rank

    new_rows: dict[int, Row] = {}
    pending_files: list[Path] = []  # latent files written since the last rewrite of the table
    flushed = 0
    # disable=None: a progress bar on a terminal only, so piped stderr holds nothing but errors
    progress = tqdm(total=len(todo), desc="medvae embed", disable=None if state.is_main_process and todo else True,
                    dynamic_ncols=True)
    for step in range(steps):
        rows, error = [], None
        for index in mine[step * batch_size:(step + 1) * batch_size]:
            try:
                row = embed_one(loaded, todo[index], sample=sample, seed=seed, spatial_pool=spatial_pool,
                                latents_dir=latents)
            except (ValueError, OSError) as err:  # reported by every rank after the gather, not a hang
                error = (index, " ".join(str(err).split()))
                break
            if row["latent_file"]:
                pending_files.append(Path(row["latent_file"]))
            rows.append((index, row))
        gathered = gather_object([{"rows": rows, "error": error}]) if world > 1 else [{"rows": rows, "error": error}]
        errors = sorted(g["error"] for g in gathered if g["error"] is not None)
        if errors:
            for path in pending_files:  # keep the latents folder in step with the table
                path.unlink(missing_ok=True)
            if latents_created:
                with contextlib.suppress(OSError):  # not empty, or another rank removed it
                    latents.rmdir()
            progress.close()
            raise ValueError(errors[0][1])
        for g in gathered:
            new_rows.update(dict(g["rows"]))
        progress.update(sum(len(g["rows"]) for g in gathered))
        if len(new_rows) - flushed >= flush_every or step == steps - 1:
            if state.is_main_process:
                write_table(existing + [new_rows[i] for i in sorted(new_rows)], out_file)
            flushed = len(new_rows)
            pending_files = []
    progress.close()
    if state.is_main_process:
        all_rows = existing + [new_rows[i] for i in sorted(new_rows)]
        if not todo:
            print(f"medvae embed: all {len(all_rows)} volume(s) are already in {out_file}")
        if scatter is not None and all_rows:
            write_pca_scatter(np.stack([r["embedding"] for r in all_rows]), [r["id"] for r in all_rows], scatter)
    state.wait_for_everyone()
    return out_file
