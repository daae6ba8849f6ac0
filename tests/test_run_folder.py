"""Run folders: never train over someone else's files; resume=auto takes the newest valid checkpoint.

The rules live in ``medvae.train.run_folder`` (plan, then apply) and the checkpoint manifest in
``medvae.train.checkpoint``; these tests build checkpoints with a real single-process Accelerator.
"""

import json

import pytest
import torch
from accelerate import Accelerator

from medvae.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    newest_valid_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from medvae.train.run_folder import RunFolderError, apply_run_folder, plan_run_folder


def _accelerator_with_state():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator


def _start(run_dir, resume=None, overwrite=False):
    plan = plan_run_folder(run_dir, resume, overwrite)
    apply_run_folder(plan, "train: {}\n")
    return plan


def _checkpoints(accelerator, run_dir, steps, keep=10):
    for step in steps:
        save_checkpoint(accelerator, run_dir, step, {"step": step}, keep=keep)


def test_non_empty_folder_without_resume_is_refused_and_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("mine")
    (run / "metrics.jsonl").write_text("line\n" * 34)
    with pytest.raises(RunFolderError, match="train.overwrite=true") as err:
        _start(run)
    assert "\n" not in str(err.value) and str(run) in str(err.value)
    assert (run / "config.yaml").read_text() == "mine"
    assert (run / "metrics.jsonl").read_text().count("\n") == 34


def test_overwrite_moves_the_old_files_aside_instead_of_deleting_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "export").mkdir()
    (run / "export" / "model.safetensors").write_bytes(b"user weights")
    plan = _start(run, overwrite=True)
    assert plan.resume_from is None
    aside = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "export" / "model.safetensors").read_bytes() == b"user weights"
    assert (run / "config.yaml").read_text() == "train: {}\n"


def test_retention_deletes_only_this_runs_checkpoints(tmp_path):
    accelerator = _accelerator_with_state()
    old, new = tmp_path / "old", tmp_path / "new"
    _start(old)
    _checkpoints(accelerator, old, [200, 300])
    # The old run's folder is given to a new run with overwrite: the old checkpoints are kept aside.
    # Within one folder, a second run (fork from step 200) must not delete the original's step 300.
    _start(new)
    _checkpoints(accelerator, new, [1, 2, 3], keep=2)
    assert [p.name for p in list_checkpoints(new)] == ["step_000002", "step_000003"]
    plan = _start(old, resume=str(old / "checkpoints" / "step_000200"))
    _checkpoints(accelerator, old, [250, 260, 270], keep=2)
    names = [p.name for p in list_checkpoints(old)]
    assert "step_000300" in names and "step_000200" in names, names  # the original run's, untouched
    assert "step_000260" in names and "step_000270" in names and "step_000250" not in names, names
    assert plan.resume_from.name == "step_000200"


def test_resume_auto_picks_the_newest_of_several(tmp_path):
    accelerator = _accelerator_with_state()
    run = tmp_path / "run"
    _start(run)
    _checkpoints(accelerator, run, [5, 100, 20], keep=5)  # written out of order on purpose
    assert plan_run_folder(run, "auto").resume_from.name == "step_000100"


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_names_it(tmp_path, capsys):
    accelerator = _accelerator_with_state()
    run = tmp_path / "run"
    _start(run)
    _checkpoints(accelerator, run, [1, 2])
    optimizer = run / "checkpoints" / "step_000002" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    config_before = (run / "config.yaml").read_bytes()
    plan = plan_run_folder(run, "auto")
    assert plan.resume_from.name == "step_000001"
    assert (run / "config.yaml").read_bytes() == config_before  # planning changed nothing
    apply_run_folder(plan, "train: {resumed: 1}\n")
    err = capsys.readouterr().err
    assert "step_000002" in err and "optimizer.bin" in err


def test_resume_auto_with_only_damaged_checkpoints_changes_nothing(tmp_path):
    accelerator = _accelerator_with_state()
    run = tmp_path / "run"
    _start(run)
    _checkpoints(accelerator, run, [1])
    (run / "checkpoints" / "step_000001" / "trainer_state.json").write_text("{")
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    with pytest.raises(CheckpointError, match="step_000001"):
        plan_run_folder(run, "auto")
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_checkpoint_without_manifest_is_checked_structurally(tmp_path):
    accelerator = _accelerator_with_state()
    run = tmp_path / "run"
    _start(run)
    _checkpoints(accelerator, run, [1, 2])
    for step in (1, 2):
        (run / "checkpoints" / f"step_{step:06d}" / "manifest.json").unlink()
    model = run / "checkpoints" / "step_000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-8])
    found, skipped = newest_valid_checkpoint(run)
    assert found.name == "step_000001" and "model.safetensors" in skipped[0]
    verify_checkpoint(found)


def test_resume_auto_after_a_crash_before_the_first_checkpoint_starts_over(tmp_path):
    run = tmp_path / "run"
    _start(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    plan = _start(run, resume="auto")
    assert plan.resume_from is None
    aside = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert (aside[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_manifest_records_the_run_id(tmp_path):
    accelerator = _accelerator_with_state()
    run = tmp_path / "run"
    plan = _start(run)
    _checkpoints(accelerator, run, [1])
    manifest = json.loads((run / "checkpoints" / "step_000001" / "manifest.json").read_text())
    assert manifest["run_id"] == plan.run_id and "optimizer.bin" in manifest["files"]
