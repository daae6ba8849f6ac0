"""Train the VAE with faults installed through ``TrainHooks``, in a fresh process (plain or under
``accelerate launch``), then dump this rank's weights.

    python tests/fault_train.py OUT [--nan-at STEP] [--nan-rank RANK] [--lr-spike STEP:FACTOR] -- key=value ...

--nan-at fills the batch of that step with NaN voxels (on every rank, or only on --nan-rank);
--lr-spike multiplies that step's LR by FACTOR. Writes OUT/rank_<r>.safetensors (final weights) and
OUT/rank_<r>.json (steps done). Exit status 3 when the guard aborts, like ``medvae train``.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

from medvae.config import load_config, to_dict
from medvae.train.guard import DivergenceError
from medvae.train.loop import TrainHooks, run_training
from medvae.train.vae_task import VAETask


def fault_hooks(nan_at: int | None, nan_rank: int | None, lr_spike: str | None) -> TrainHooks:
    spike_step, spike_factor = (int(lr_spike.split(":")[0]), float(lr_spike.split(":")[1])) if lr_spike else (None, 1.0)

    def on_batch(step: int, batch: dict) -> dict:
        if step == nan_at and nan_rank in (None, PartialState().process_index):
            batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
        return batch

    def on_lr(step: int, lr: float) -> float:
        return lr * spike_factor if step == spike_step else lr

    return TrainHooks(on_batch=on_batch, on_lr=on_lr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--nan-rank", type=int)
    parser.add_argument("--lr-spike")
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    args = parser.parse_args(sys.argv[1:split])
    config = load_config(None, sys.argv[split + 1:])
    try:
        result = run_training(VAETask(config), config.train, config.tracking, to_dict(config),
                              hooks=fault_hooks(args.nan_at, args.nan_rank, args.lr_spike))
    except DivergenceError as err:
        print(f"aborted: {err}", file=sys.stderr)
        sys.exit(3)
    rank = PartialState().process_index
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
              str(args.out / f"rank_{rank}.safetensors"))
    (args.out / f"rank_{rank}.json").write_text(json.dumps({"step": result.step}))


if __name__ == "__main__":
    main()
