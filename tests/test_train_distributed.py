"""Two real gloo ranks under `accelerate launch`: data-parallel training keeps the ranks in sync."""

import json
import shutil
import sys

import torch
from safetensors.torch import load_file

from phantoms import write_phantoms
from training_helpers import TINY_TRAINING, read_jsonl, run_medvae_train

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def test_two_cpu_ranks_train_data_parallel(tmp_path):
    import subprocess, os
    from pathlib import Path

    write_phantoms(tmp_path / "data", count=9)
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("distributed_train.py")
    overrides = TINY_TRAINING + [f"data.train={tmp_path / 'data'}", "train.max_steps=4", "data.batch_size=1",
                                 f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=100"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(script.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(LAUNCH + [str(script), str(out), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    info = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert all(i["num_processes"] == 2 and "MULTI_CPU" in i["distributed_type"] for i in info)
    assert all(i["backend"] == "gloo" for i in info)
    # each rank saw its own share of the data
    assert len(info[0]["seen_ids"]) == len(info[1]["seen_ids"]) == 4
    assert info[0]["seen_ids"] != info[1]["seen_ids"]

    rank0, rank1 = load_file(str(out / "rank_0.safetensors")), load_file(str(out / "rank_1.safetensors"))
    initial = load_file(str(out / "initial.safetensors"))
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    moved = sum(float((rank0[n].float() - initial[n].float()).abs().sum()) for n in rank0)
    assert moved > 0, "training changed nothing"

    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[0]["train/effective_batch_size"] == 2
    assert metrics[0]["train/num_processes"] == 2
