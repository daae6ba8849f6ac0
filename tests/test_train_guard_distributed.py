"""Two real gloo ranks under `accelerate launch`, a NaN batch on rank 1 only: both ranks see the fault
(the guard judges all-reduced numbers), take the same action, and end with identical weights."""

import json
import sys

import torch
from safetensors.torch import load_file

from phantoms import write_phantoms
from training_helpers import TINY_TRAINING, read_jsonl, run_fault_train

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def test_a_fault_on_one_rank_is_handled_the_same_on_both(tmp_path):
    write_phantoms(tmp_path / "data", count=9)
    run = tmp_path / "run"
    result = run_fault_train(tmp_path, ["--nan-at", "2", "--nan-rank", "1"], TINY_TRAINING + [
        f"data.train={tmp_path / 'data'}", f"train.output_dir={run}", "train.max_steps=5", "data.batch_size=1",
        "train.val_every=0", "train.checkpoint_every=100", "train.guard.snapshot_every=1",
    ], launcher=LAUNCH)
    assert result.returncode == 0, result.stderr[-4000:]

    # Rank 1's NaN reached both ranks through the all-reduce; the one events log names it.
    events = read_jsonl(run / "events.jsonl")
    assert {(e["step"], e["action"]) for e in events} == {(2, "rollback")}
    assert {"nonfinite_loss", "nonfinite_grad"} <= {e["kind"] for e in events}
    assert len(events[0]["batch_ids"]) == 2  # both ranks' files of that step
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train/step_applied" in r]
    assert [r["train/step_applied"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert rows[-1]["train/lr_scale"] == 0.5

    # Both ranks took the same action: their weights are identical, finite, and moved after the fault.
    info = [json.loads((tmp_path / "weights" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["step"] == info[1]["step"] == 5
    rank0, rank1 = (load_file(str(tmp_path / "weights" / f"rank_{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        assert torch.isfinite(rank0[name]).all(), name
