"""End to end on CPU: train, checkpoint atomically, export, and resume with identical losses."""

import shutil

import torch

from medvae import load_model
from medvae.train.checkpoint import list_checkpoints
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

    # A second run starts from the step-3 checkpoint of the first.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_000003", resumed_dir / "checkpoints" / "step_000003")
    resumed = run_medvae_train(tmp_path, common + [f"train.output_dir={resumed_dir}", "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    full_losses = losses_by_step(run)
    resumed_losses = losses_by_step(resumed_dir)
    assert sorted(resumed_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    assert read_jsonl(run / "metrics.jsonl")[0]["train/effective_batch_size"] == 2
