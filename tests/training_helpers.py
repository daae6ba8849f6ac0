"""Shared pieces of the end-to-end training tests: a tiny config and readers for the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FAULT_SCRIPT = Path(__file__).with_name("fault_train.py")

TINY_TRAINING = [
    "model.channels=[8,16]",
    "model.norm_num_groups=4",
    "model.latent_channels=2",
    "data.patch_size=[16,16,16]",
    "data.batch_size=2",
    "data.val_fraction=0.2",
    "train.warmup_steps=2",
    "train.val_every=3",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=10",
    "tracking.log_every=1",
    "tracking.wandb_mode=offline",
]


def run_medvae_train(cwd: Path, overrides: list[str], launcher: list[str] | None = None, timeout=300):
    """Run ``medvae train`` (optionally under ``accelerate launch``) in a fresh process."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    command = (launcher or [sys.executable]) + ["-m", "medvae", "train", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_fault_train(cwd: Path, faults: list[str], overrides: list[str], launcher: list[str] | None = None,
                    timeout=300):
    """Run tests/fault_train.py (training with faults installed through TrainHooks) in a fresh process;
    it writes this rank's final weights to ``cwd / "weights"``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(FAULT_SCRIPT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = (launcher or [sys.executable]) + [str(FAULT_SCRIPT), str(cwd / "weights"), *faults, "--", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row}
