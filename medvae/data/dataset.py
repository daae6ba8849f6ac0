"""Training and validation datasets: datalists -> checked, cached MONAI datasets + the preprocessing record.

Every volume goes once through the deterministic part of its pipeline (load ... pad) before
training starts. That pass is where bad files surface: by default the first one stops the run
with its one-line error; with ``data.on_bad_file=skip`` it is left out and listed, with the
reason, in ``<run_dir>/skipped_files.json``. An unreadable volume is never replaced by zeros.
The same pass collects each training volume's intensity parameters for the exported model.

Caching (``data.cache``):
- ``memory``: MONAI ``CacheDataset`` holding the checked, preprocessed volumes; each epoch only
  runs the random crop and augmentations.
- ``disk``: MONAI ``PersistentDataset`` under ``<run_dir>/cache/<phase>-<settings hash>``.
- ``none``: MONAI ``Dataset``: every item is read and preprocessed on every access.

Items out of either dataset: ``image`` (1, D, H, W) float32 MetaTensor, ``id``, ``path``,
``modality``; after ``monai.data.list_data_collate``: ``batch["image"]`` (B, 1, D, H, W),
``batch["id"]`` and ``batch["path"]`` lists of B strings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose
from monai.transforms.transform import RandomizableTrait

from medvae.atomic import atomic_file
from medvae.config import Config, DataConfig, to_dict
from medvae.data.datalist import Item, resolve_datalists
from medvae.data.intensity import preprocessing_description, summarize_intensity
from medvae.data.transforms import BAD_INPUT_ERRORS, KEY, Pipeline, build_transforms, check_patch_size, root_cause

SKIPPED_FILES = "skipped_files.json"


def _one_line(err: BaseException, item: Item) -> str:
    message = " ".join(str(err).split())
    return message if str(item[KEY]) in message else f"{item[KEY]}: {message}"


def split_pipeline(pipeline: Compose) -> tuple[Pipeline, Pipeline]:
    """(deterministic head, random tail) of a pipeline, split at the first random transform."""
    first_random = pipeline.get_index_of_first(lambda t: isinstance(t, RandomizableTrait))
    if first_random is None:
        return Pipeline(pipeline.transforms), Pipeline([])
    return Pipeline(pipeline.transforms[:first_random]), Pipeline(pipeline.transforms[first_random:])


@dataclass
class Prepared:
    """The outcome of the checking pass over one phase's items."""

    items: list[Item] = field(default_factory=list)  # the good input items, in datalist order
    outputs: list[Item] = field(default_factory=list)  # their preprocessed outputs (if kept)
    intensity: list[dict[str, Any]] = field(default_factory=list)  # meta["intensity"] of each good item
    spacing: list[list[float]] = field(default_factory=list)  # voxel size (mm, D H W) of each good item
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"phase", "id", "path", "reason"}


def prepare_items(items: list[Item], transform: Compose, on_bad_file: str = "fail", phase: str = "train",
                  keep_outputs: bool = True) -> Prepared:
    """Run the deterministic ``transform`` over ``items`` in order, checking every file.

    ``on_bad_file="fail"`` raises the first bad file's one-line error as ValueError; ``"skip"``
    records it in ``skipped`` and goes on. Programming errors (anything but ValueError/OSError)
    always propagate.
    """
    prepared = Prepared()
    for item in items:
        try:
            output = transform(dict(item))
        except Exception as err:  # noqa: BLE001 - narrowed just below, after unwrapping any MONAI RuntimeError
            cause = root_cause(err)
            if not isinstance(cause, BAD_INPUT_ERRORS):
                raise
            message = _one_line(cause, item)
            if on_bad_file != "skip":
                raise ValueError(message) from None
            prepared.skipped.append({"phase": phase, "id": item["id"], "path": str(item[KEY]), "reason": message})
            continue
        prepared.items.append(item)
        prepared.intensity.append(dict(output[KEY].meta["intensity"]))
        prepared.spacing.append([float(s) for s in output[KEY].pixdim])
        if keep_outputs:
            prepared.outputs.append(output)
    return prepared


def _settings_hash(data_config: DataConfig, phase: str, downsampling_factor: int) -> str:
    """Hash of everything that changes a preprocessed volume, so a disk cache never serves stale data."""
    settings = to_dict(Config(data=data_config))["data"]
    for name in ("train", "val", "val_fraction", "batch_size", "num_workers", "cache", "on_bad_file", "augment"):
        settings.pop(name, None)
    settings.update(phase=phase, downsampling_factor=downsampling_factor)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _dataset(data_config: DataConfig, phase: str, downsampling_factor: int, prepared: Prepared,
             pipeline: Compose, run_dir: Path) -> Dataset:
    if data_config.cache == "memory":
        # The checked outputs are the cache: the dataset only runs the random tail on them.
        _, random_tail = split_pipeline(pipeline)
        return CacheDataset(prepared.outputs, transform=random_tail, progress=False, copy_cache=True)
    if data_config.cache == "disk":
        cache_dir = run_dir / "cache" / f"{phase}-{_settings_hash(data_config, phase, downsampling_factor)}"
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(prepared.items, transform=pipeline, cache_dir=cache_dir, track_meta=True,
                                 weights_only=True)
    return Dataset(prepared.items, transform=pipeline)


def write_skipped(run_dir: str | os.PathLike, skipped: list[dict[str, Any]]) -> Path:
    """Write ``<run_dir>/skipped_files.json`` atomically: ``{"num_skipped": n, "skipped": [...]}``."""
    path = Path(run_dir) / SKIPPED_FILES
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"num_skipped": len(skipped), "skipped": skipped}, indent=2) + "\n")
    return path


def build_datasets(config: Config, downsampling_factor: int, run_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(train dataset, val dataset, preprocessing description) for ``config.data``.

    ``run_dir`` (default ``config.train.output_dir``) receives ``skipped_files.json`` (skip mode)
    and the disk cache. ``cache_dir``: where ``data.train="demo"`` is materialised. The val
    dataset may be empty (``data.val_fraction=0`` and no ``data.val``). Raises ValueError for the
    first bad file (``on_bad_file=fail``), or when every training file was skipped.
    """
    data = config.data
    run_dir = Path(run_dir if run_dir is not None else config.train.output_dir)
    check_patch_size(data.patch_size, downsampling_factor)
    train_items, val_items = resolve_datalists(data, seed=config.train.seed, cache_dir=cache_dir)

    pipelines, prepared = {}, {}
    for phase, items in (("train", train_items), ("val", val_items)):
        pipelines[phase] = build_transforms(data, phase, downsampling_factor)
        pipelines[phase].set_random_state(seed=config.train.seed)
        head, _ = split_pipeline(pipelines[phase])
        prepared[phase] = prepare_items(items, head, data.on_bad_file, phase, keep_outputs=data.cache == "memory")
    skipped = prepared["train"].skipped + prepared["val"].skipped
    if data.on_bad_file == "skip":
        write_skipped(run_dir, skipped)
    if not prepared["train"].items:
        where = f"; see {run_dir / SKIPPED_FILES}" if skipped else ""
        raise ValueError(f"data.train={data.train!r}: no usable training volumes{where}")
    train_set, val_set = (_dataset(data, phase, downsampling_factor, prepared[phase], pipelines[phase], run_dir)
                          for phase in ("train", "val"))
    stats = summarize_intensity(prepared["train"].intensity)
    description = preprocessing_description(data, stats, downsampling_factor)
    # What the model saw, voxel size per axis after orientation and resampling: generate writes at it.
    description["median_training_spacing"] = median_spacing(prepared["train"].spacing)
    return train_set, val_set, description


def median_spacing(spacings: list[list[float]]) -> list[float]:
    """Per-axis median of (D, H, W) voxel sizes in mm, rounded to 1e-4 mm."""
    return [round(float(v), 4) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0)]
