"""The run folder of a training run: never train over files that are not this run's, and choose
what to resume from before anything in the folder changes.

    plan = plan_run_folder(run_dir, resume=t.resume, overwrite=t.overwrite)   # every rank, read-only
    if accelerator.is_main_process:
        apply_run_folder(plan, to_yaml(config))                                # then write
    accelerator.wait_for_everyone()
    ... plan.resume_from: the checkpoint to load, or None

Rules:

- No ``train.resume`` and a non-empty folder: refused in one line that says how to resume or where
  to go, unless ``train.overwrite=true``, which moves everything there into
  ``previous-<UTC time>/`` inside the folder (nothing is deleted).
- ``train.resume=auto``: the newest checkpoint that passes ``verify_checkpoint``; damaged newer ones
  are named (one line each) and left in place. No checkpoint at all: a fresh start in an empty
  folder, or in the folder of a medvae run that stopped before its first checkpoint (its files are
  moved to ``previous-<UTC time>/``); any other non-empty folder is refused as above.
- ``train.resume=PATH``: that checkpoint (or the newest valid one of that run folder), verified.

Nothing is written until a plan exists, so a refused or failed resume leaves the folder as it was.
The run id written to ``.medvae-run-id`` stamps every checkpoint this run writes; retention
(``medvae.train.checkpoint``) deletes only checkpoints carrying it.
"""

from __future__ import annotations

import datetime
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from medvae.atomic import atomic_file
from medvae.train.checkpoint import (
    RUN_ID_FILE,
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    newest_valid_checkpoint,
    resolve_resume,
    run_id_of,
)

CONFIG_NAME = "config.yaml"


class RunFolderError(FileExistsError):
    """Training would write over files that are not this run's; ``str(err)`` is one line."""


@dataclass
class RunFolderPlan:
    run_dir: Path  # absolute
    resume_from: Path | None  # checkpoint folder to load, None for a fresh start
    run_id: str  # stamped on this run's checkpoints
    set_aside: bool = False  # move the folder's current content into previous-<time>/ first
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over, one line each
    notes: list[str] = field(default_factory=list)  # what apply_run_folder will say it did


def plan_run_folder(run_dir: str | Path, resume: str | None, overwrite: bool = False) -> RunFolderPlan:
    """Decide, reading only, what training in ``run_dir`` will resume from; raise if it must not start."""
    run_dir = Path(run_dir).resolve()
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: train.output_dir is a file, not a folder")
    new_id = uuid.uuid4().hex[:16]

    if resume is None:
        if entries and not overwrite:
            raise RunFolderError(_occupied(run_dir, entries))
        return RunFolderPlan(run_dir, None, new_id, set_aside=bool(entries),
                             notes=[f"moved the previous content to {run_dir}/previous-*"] if entries else [])

    if resume == "auto":
        found, skipped = newest_valid_checkpoint(run_dir)
        if found is not None:
            return RunFolderPlan(run_dir, found, run_id_of(found) or new_id, skipped=skipped)
        if skipped and not overwrite:
            raise CheckpointError(f"{run_dir}: no valid checkpoint to resume from ({'; '.join(skipped)}); "
                                  "set train.overwrite=true to start over (the old files are kept in previous-*)")
        if not entries:
            return RunFolderPlan(run_dir, None, new_id)
        never_checkpointed = CONFIG_NAME in entries and not list_checkpoints(run_dir)
        if not (overwrite or never_checkpointed):
            raise RunFolderError(_occupied(run_dir, entries, auto=True))
        return RunFolderPlan(run_dir, None, new_id, set_aside=True, skipped=skipped,
                             notes=[f"no checkpoint to resume from; started over, the previous files are in "
                                    f"{run_dir}/previous-*"])

    found = resolve_resume(resume, run_dir)
    assert found is not None
    inside = found.parent == checkpoint_dir(run_dir)
    if entries and not inside and not overwrite:
        raise RunFolderError(_occupied(run_dir, entries))
    newest, _ = newest_valid_checkpoint(run_dir) if inside else (None, [])
    # Resuming an older checkpoint of this folder forks the run: the fork gets its own id, so its
    # retention never deletes the newer checkpoints of the original.
    run_id = (run_id_of(found) or new_id) if inside and newest == found else new_id
    return RunFolderPlan(run_dir, found, run_id, set_aside=bool(entries) and not inside)


def apply_run_folder(plan: RunFolderPlan, config_yaml: str) -> None:
    """Main process only: set the old content aside (if planned), record the run id, write config.yaml,
    and say on stderr which damaged checkpoints were skipped."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.set_aside:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = run_dir / f"previous-{stamp}"
        n = 1
        while aside.exists():
            aside, n = run_dir / f"previous-{stamp}-{n}", n + 1
        aside.mkdir()
        for entry in sorted(run_dir.iterdir()):
            if entry != aside:
                entry.rename(aside / entry.name)
    for line in plan.skipped:
        print(f"medvae train: skipped damaged checkpoint {line}", file=sys.stderr)
    for line in plan.notes:
        print(f"medvae train: {line}", file=sys.stderr)
    with atomic_file(run_dir / RUN_ID_FILE) as tmp:
        tmp.write_text(plan.run_id + "\n")
    with atomic_file(run_dir / CONFIG_NAME) as tmp:
        tmp.write_text(config_yaml)


def _occupied(run_dir: Path, entries: list[str], auto: bool = False) -> str:
    found = list_checkpoints(run_dir)
    what = (f"holds a run with checkpoints up to {found[-1].name}" if found
            else f"is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    hint = ("train.resume=auto to continue it, " if found and not auto else "")
    return (f"{run_dir}: {what}; use {hint}a new train.output_dir, or train.overwrite=true to start over "
            "(the old files are moved to previous-*, never deleted)")
