"""Inject faults into a real run through TrainHooks (tests/fault_train.py) and check that the guard
sees them, acts, and records them everywhere."""

import torch

from medvae import load_model
from phantoms import write_phantoms
from training_helpers import TINY_TRAINING, read_jsonl, run_fault_train
from wandb_offline import alerts, history_keys, read_records, run_files


def test_nan_batch_and_lr_spike_are_caught_recovered_and_recorded(tmp_path):
    write_phantoms(tmp_path / "data", count=5)
    run = tmp_path / "run"
    result = run_fault_train(tmp_path, ["--nan-at", "4", "--lr-spike", "8:1e4"], TINY_TRAINING + [
        f"data.train={tmp_path / 'data'}", f"train.output_dir={run}", "train.max_steps=14",
        "train.val_every=0", "train.checkpoint_every=100", "train.guard.min_history=3",
        "train.guard.snapshot_every=2", "train.guard.rise_window=3",
    ])
    assert result.returncode == 0, result.stderr[-3000:]

    events = read_jsonl(run / "events.jsonl")
    by_step = {}
    for event in events:
        by_step.setdefault(event["step"], []).append(event)
    # the NaN batch: a non-finite loss, rolled back (the default), with the batch's files named
    nan_events = by_step.get(4, [])
    assert any(e["kind"] == "nonfinite_loss" and e["action"] == "rollback" for e in nan_events)
    assert all(e["batch_ids"] and all(i.startswith("vol_") for i in e["batch_ids"]) for e in nan_events)
    # the LR spike wrecks the weights; the next steps show it and are rolled back
    after_spike = [e for step, es in by_step.items() if step > 8 for e in es]
    assert any(e["kind"] in {"grad_spike", "term_spike", "primary_rise", "nonfinite_loss", "nonfinite_grad"}
               for e in after_spike)
    assert any(e["action"] in {"rollback", "lower_lr", "skip"} for e in after_spike)

    metrics = [row for row in read_jsonl(run / "metrics.jsonl") if "train/lr_scale" in row]
    assert metrics[-1]["train/lr_scale"] < 1.0, "the LR was backed off"
    assert metrics[-1]["train/step_applied"] == 1.0, "training recovered and goes on"

    model = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # the same events reached wandb: as logged keys and as alerts
    files = run_files(run)
    assert files, "no wandb offline run file"
    records = read_records(files[0])
    keys = history_keys(records)
    assert "guard/nonfinite_loss" in keys and "guard/events_total" in keys
    titles = [title + " " + text for title, text in alerts(records)]
    assert any("nonfinite_loss" in title for title in titles)


def test_the_lr_back_off_recovers_in_a_real_run(tmp_path):
    write_phantoms(tmp_path / "data", count=5)
    run = tmp_path / "run"
    result = run_fault_train(tmp_path, ["--nan-at", "2"], TINY_TRAINING + [
        f"data.train={tmp_path / 'data'}", f"train.output_dir={run}", "train.max_steps=9", "train.val_every=0",
        "train.checkpoint_every=100", "train.guard.recover_steps=3", "tracking.wandb_mode=disabled",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train/lr_scale" in r]
    # step 2 (row 3) rolled back and halved the LR; three good steps later it is whole again
    assert [r["train/lr_scale"] for r in rows] == [1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert [r["train/step_applied"] for r in rows] == [1.0, 1.0, 0.0] + [1.0] * 6
    recovered = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "lr_recovered"]
    assert [(e["step"], e["action"], e["values"]["lr_scale"]) for e in recovered] == [(5, "record", 1.0)]
