"""Training checkpoints: ``accelerator.save_state`` written atomically, the last K kept.

Layout of a run folder::

    run/checkpoints/step_000500/   model.safetensors, optimizer.bin, scaler.pt, random_states_*.pkl
                                   (Accelerate), trainer_state.json, ema.safetensors (medvae),
                                   manifest.json (size and SHA-256 of every file, and the run id)
    run/checkpoints/.step_000600.tmp/   a checkpoint being written (never read)

A checkpoint folder appears under its final name only once every rank has finished writing it, so
a crash mid-write leaves the previous checkpoint as the latest. Loading goes through Accelerate's
``load_state``, which reads tensors with ``torch.load(weights_only=True)``; medvae's own state is
JSON and safetensors. Nothing registered with ``register_for_checkpointing`` (which Accelerate
would unpickle) is used.

``manifest.json`` lets ``resume=auto`` tell a damaged checkpoint (a truncated ``optimizer.bin``, a
disk error) from a good one before loading anything, and lets retention delete only checkpoints
of this run (``RUN_ID_FILE`` in the run folder names it; see ``medvae.train.run_folder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
RUN_ID_FILE = ".medvae-run-id"  # in the run folder: the id stamped on the checkpoints this run writes

# Checkpoints written by this process, for retention when the run folder has no run id file.
_written_here: set[Path] = set()


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; ``str(err)`` is ``"<path>: <problem>"``."""


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
        found, _ = newest_valid_checkpoint(run_dir)
        return found
    path = Path(resume)
    if path.is_dir() and (path / TRAINER_STATE).is_file():
        verify_checkpoint(path)
        return path
    if path.is_dir() and list_checkpoints(path):  # a run folder
        found, skipped = newest_valid_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint ({'; '.join(skipped)})")
        return found
    raise FileNotFoundError(f"{path}: not a medvae checkpoint (no {TRAINER_STATE}) nor a run folder with checkpoints")


def newest_valid_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that passes ``verify_checkpoint`` or None, one line per damaged newer one)."""
    skipped: list[str] = []
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return candidate, skipped
    return None, skipped


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint folder without unpickling anything; return its manifest (``{}`` if none).

    With a manifest: every file listed is present with its size and SHA-256. Without one (older
    checkpoints): ``trainer_state.json`` parses, safetensors headers are readable and torch's zip
    files (``optimizer.bin``, ``scaler.pt``) pass their CRC checks.
    """
    path = Path(path)
    state_file = path / TRAINER_STATE
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{state_file}: unreadable trainer state ({' '.join(str(err).split())})") from None
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
            files = dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{manifest_file}: unreadable manifest ({err})") from None
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            if file.stat().st_size != expected["size"]:
                raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the checkpoint wrote {expected['size']}")
            if _sha256(file) != expected["sha256"]:
                raise CheckpointError(f"{file}: content changed since it was written (SHA-256 mismatch)")
        return manifest
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as fh:
                    list(fh.keys())
            elif file.suffix in (".bin", ".pt") and zipfile.is_zipfile(file):
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC check")
            elif file.suffix in (".bin", ".pt"):
                raise ValueError("not a torch zip file (truncated?)")
        except (SafetensorError, OSError, ValueError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"{file}: damaged ({' '.join(str(err).split())})") from None
    return {}


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
        run_id = current_run_id(run_dir)
        _write_manifest(tmp, run_id)
        _fsync_tree(tmp)
        if final.exists():
            ours = final in _written_here if run_id is None else run_id_of(final) == run_id
            if ours:  # this run's own checkpoint of the same step (written again after a resume)
                shutil.rmtree(final)
            else:  # another run's (or a damaged) checkpoint: keep it, out of resume's way
                os.replace(final, _free_name(final.with_name(f"{final.name}.set-aside")))
        os.replace(tmp, final)
        _written_here.add(final)
        _apply_retention(run_dir, run_id, keep)
    accelerator.wait_for_everyone()
    return final


def current_run_id(run_dir: Path) -> str | None:
    """The id of the run training in ``run_dir`` (written by ``medvae.train.run_folder``), or None."""
    try:
        return (Path(run_dir) / RUN_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def run_id_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _apply_retention(run_dir: Path, run_id: str | None, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints of this run; never touch another run's checkpoints."""
    if keep <= 0:
        return
    if run_id is not None:
        ours = [p for p in list_checkpoints(run_dir) if run_id_of(p) == run_id]
    else:
        ours = [p for p in list_checkpoints(run_dir) if p in _written_here]
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        _written_here.discard(old)


def _free_name(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def _write_manifest(folder: Path, run_id: str | None) -> None:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"run_id": run_id, "files": files}, indent=1, sort_keys=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore every prepared object from ``path``; return the trainer state (JSON).

    A file that fails to load is reported as ``CheckpointError`` naming the checkpoint folder.
    """
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: cannot be restored ({' '.join(str(err).split())[:300]})") from None
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
