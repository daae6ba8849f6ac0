"""``medvae reconstruct``: encode (posterior mean) and decode volumes, back in their own units and geometry.

    medvae reconstruct --model runs/x --out recon/ scan.nii.gz dicom_series/ list.csv

Each input goes through the model's infer pipeline, the memory-bounded encoder and decoder, then
back through ``restore_geometry`` (padding, spacing and orientation undone: the file's own voxel grid
and affine) and the inverse of its own intensity normalisation (HU for CT, clipped to the training
window). Output: ``<name>`` for a NIfTI input (same file name), ``<id>.nii.gz`` for a DICOM series,
plus ``reconstruction.json`` (model hash, input -> output). ``--out`` must be a new or empty folder;
it appears complete, or not at all if any input is bad.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medvae.jobs.loading import Item, load_for_inference, new_output_folder, resolve_inputs, to_real_units


def output_name(item: Item) -> str:
    """The reconstruction's file name: the input's own for NIfTI, else ``<id>.nii.gz``."""
    name = Path(item["image"]).name
    return name if name.lower().endswith((".nii", ".nii.gz")) else f"{item['id']}.nii.gz"


def reconstruct(model_dir: str | os.PathLike, out_dir: str | os.PathLike, inputs: list,
                memory_budget: int | None = None) -> Path:
    """Write the reconstruction of every input into the new folder ``out_dir``; return it."""
    from medvae.data import restore_geometry
    from medvae.io import write_volume

    loaded = load_for_inference(model_dir, memory_budget=memory_budget)
    items = resolve_inputs(inputs, loaded.modality)
    names: dict[str, str] = {}
    for item in items:
        name = output_name(item)
        if name in names:
            raise ValueError(f"{item['image']}: its reconstruction would be {name}, like that of {names[name]}; "
                             "reconstruct them into separate folders")
        names[name] = item["image"]
    records = []
    with new_output_folder(out_dir) as tmp:
        for item in items:
            image = loaded.prepare(item)  # (1, D, H, W) normalised, model grid
            restored = restore_geometry(loaded.reconstruct(image), image, loaded.transform)  # (1, I, J, K)
            array = to_real_units(restored.as_tensor()[0], image.meta["intensity"])
            modality = image.meta.get("modality")
            modality = modality if modality in ("CT", "MR") else None
            name = output_name(item)
            write_volume(array, tmp / name, affine=restored.affine.numpy(), modality=modality)
            records.append({"id": item["id"], "input": str(Path(item["image"]).resolve()), "output": name})
        (tmp / "reconstruction.json").write_text(json.dumps(
            {"command": "reconstruct", "model": str(loaded.directory), "model_hash": loaded.hash,
             "units": "HU" if loaded.modality == "CT" else "the input's own", "volumes": records}, indent=2) + "\n")
    return Path(out_dir)
