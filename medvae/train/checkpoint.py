"""Training checkpoints: ``accelerator.save_state`` written atomically, the last K kept.

Layout of a run folder::

    run/checkpoints/step_000500/   model.safetensors, optimizer.bin, scaler.pt, random_states_*.pkl
                                   (Accelerate), trainer_state.json, ema.safetensors (medvae)
    run/checkpoints/.step_000600.tmp/   a checkpoint being written (never read)

A checkpoint folder appears under its final name only once every rank has finished writing it, so
a crash mid-write leaves the previous checkpoint as the latest. Loading goes through Accelerate's
``load_state``, which reads tensors with ``torch.load(weights_only=True)``; medvae's own state is
JSON and safetensors. Nothing registered with ``register_for_checkpointing`` (which Accelerate
would unpickle) is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``None`` -> None; ``"auto"`` -> latest checkpoint of ``run_dir`` or None; else that path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and (path / TRAINER_STATE).is_file():
        return path
    if path.is_dir() and list_checkpoints(path):  # a run folder
        return list_checkpoints(path)[-1]
    raise FileNotFoundError(f"{path}: not a medvae checkpoint (no {TRAINER_STATE}) nor a run folder with checkpoints")


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    extra_tensors: dict[str, dict] | None = None,
    keep: int = 2,
) -> Path:
    """Save every prepared object plus ``trainer_state`` (JSON) as ``checkpoints/step_NNNNNN``.

    Called on every rank (Accelerate writes per-rank RNG states). ``extra_tensors`` maps a file
    name (e.g. ``"ema.safetensors"``) to a state dict written with safetensors by the main process.
    """
    from safetensors.torch import save_file

    folder = checkpoint_dir(run_dir)
    final = folder / f"step_{step:06d}"
    tmp = folder / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, state in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / name))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore every prepared object from ``path``; return the trainer state (JSON)."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
