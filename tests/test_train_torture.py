"""Hostile settings: fp16 autocast on CPU, CT left in Hounsfield units, lr 1e-2, KL weight 1, no annealing.

The peers' recipe goes non-finite within a few steps; medvae's defaults finish with finite weights,
apply most optimizer steps, and record what they did.
"""

import sys
from pathlib import Path

import torch

from phantoms import phantom, write_phantoms
from training_helpers import TINY_TRAINING, read_jsonl, run_medvae_train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from naive_loop import naive_monai_run  # noqa: E402

HOSTILE = ["train.mixed_precision=fp16", "train.lr=1e-2", "loss.kl_weight=1.0", "loss.kl_schedule=constant",
           "data.intensity.preset=none", "data.modality=CT"]


def test_naive_fp16_loop_goes_nonfinite_on_hounsfield_units():
    volumes = torch.stack([torch.from_numpy(phantom((16, 16, 16), seed=s, scale=3000.0, offset=-1024.0))[None]
                           for s in range(2)])
    # the comparison architecture: channels (32, 64, 64), one res block, latent 3, 32 groups
    run = naive_monai_run(volumes, steps=5, lr=1e-2, kl_weight=1.0, precision="fp16")
    assert run.first_nonfinite_step is not None and run.first_nonfinite_step < 5
    assert not run.weights_finite


def test_medvae_defaults_survive_the_same_settings(tmp_path):
    write_phantoms(tmp_path / "data", count=4, shape=(16, 16, 16), scale=3000.0, offset=-1024.0)
    same_architecture = ["model.channels=[32,64,64]", "model.norm_num_groups=32", "model.latent_channels=3"]
    result = run_medvae_train(tmp_path, TINY_TRAINING + same_architecture + HOSTILE + [
        f"data.train={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=8",
        "train.warmup_steps=1", "train.val_every=0", "train.checkpoint_every=100",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    from medvae import load_model

    model = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/step_applied" in row]
    assert len(metrics) == 8
    applied = sum(row["train/step_applied"] for row in metrics)
    assert applied >= 5, f"only {applied} of 8 steps applied"
    assert all("train/loss_scale" in row for row in metrics)  # the grad scaler's state is recorded
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    if applied < 8:  # every step not applied is explained in the events log
        skipped_steps = {row["step"] - 1 for row in metrics if row["train/step_applied"] == 0.0}
        assert skipped_steps <= {event["step"] for event in events}
