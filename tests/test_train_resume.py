"""End to end on CPU: train, checkpoint atomically, export, and resume with identical losses."""

import json
import shutil

import torch
import yaml

from medvae import load_model
from medvae.train.checkpoint import MANIFEST, list_checkpoints
from phantoms import write_phantoms
from training_helpers import TINY_TRAINING, losses_by_step, read_jsonl, run_medvae_train


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    write_phantoms(tmp_path / "data", count=5)
    common = TINY_TRAINING + [f"data.train={tmp_path / 'data'}", "train.max_steps=6"]
    full = run_medvae_train(tmp_path, common + [f"train.output_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    assert "run folder" in full.stdout

    run = tmp_path / "full"
    assert [p.name for p in list_checkpoints(run)] == ["step_000003", "step_000006"]
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "config.json").is_file()
    assert list((run / "previews").glob("*.png"))
    assert not list((run / "checkpoints").glob(".*")), "no temporary checkpoint left behind"
    model = load_model(run)
    for p in model.parameters():
        assert torch.isfinite(p).all()

    # Training again into the finished run folder without resume is refused, and changes nothing.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = run_medvae_train(tmp_path, common + [f"train.output_dir={run}"])
    assert again.returncode == 1 and "train.resume=auto" in again.stderr, again.stderr[-2000:]
    assert len([line for line in again.stderr.splitlines() if "error:" in line]) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # A second run gets both checkpoints of the first, the newest one damaged: resume=auto names it
    # and starts from step 3, before writing anything into the folder.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints", resumed_dir / "checkpoints")
    optimizer = resumed_dir / "checkpoints" / "step_000006" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:64])
    resumed = run_medvae_train(tmp_path, common + [f"train.output_dir={resumed_dir}", "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped damaged checkpoint" in resumed.stderr and "step_000006" in resumed.stderr

    full_losses = losses_by_step(run)
    resumed_losses = losses_by_step(resumed_dir)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    assert read_jsonl(run / "metrics.jsonl")[0]["train/effective_batch_size"] == 2

    # Resuming the same weights into a different function is refused in one line, before anything is
    # written: a parameter-free field (the shortcut's code) counts like any other.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = run_medvae_train(tmp_path, common + [f"train.output_dir={run}", "train.resume=auto", "model.shortcut=mean"])
    assert other.returncode == 1, other.stderr[-2000:]
    errors = [line for line in other.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "model.shortcut='dct' there, 'mean' now" in errors[0], other.stderr[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # A checkpoint written before signatures were stored is judged by its run's config.yaml, where a
    # model section without the field means a model trained without a shortcut.
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints", old / "checkpoints")
    for step in ("step_000003", "step_000006"):
        state_file = old / "checkpoints" / step / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["model_signature"]
        state_file.write_text(json.dumps(state))
        (old / "checkpoints" / step / MANIFEST).unlink()  # as older checkpoints were verified: without one
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["model"]["shortcut"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    refused = run_medvae_train(tmp_path, common + [f"train.output_dir={old}", "train.resume=auto"])
    assert refused.returncode == 1 and "model.shortcut='none' there, 'dct' now" in refused.stderr, refused.stderr[-2000:]

    # A damaged config.yaml beside such a checkpoint: one line naming the file, nothing written.
    (old / "config.yaml").write_text("model: [unclosed\n")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    damaged = run_medvae_train(tmp_path, common + [f"train.output_dir={old}", "train.resume=auto"])
    errors = [line for line in damaged.stderr.splitlines() if "error:" in line]
    assert damaged.returncode == 1 and len(errors) == 1, damaged.stderr[-2000:]
    assert str(old / "config.yaml") in errors[0] and "cannot tell which model" in errors[0]
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
