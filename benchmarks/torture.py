"""Stability under hostile settings: the peers' plain loop against medvae's training loop, side by side.

For each setting (precision fp16/bf16/fp32, lr 1e-3/1e-2, HU-scale or normalised input, KL weight 1
or 1e-6, no KL annealing) and each seed, both train the comparison architecture (channels 32/64/64,
one res block, latent 3, 32 groups) on the same crops of real anatomy (benchmarks/real_volumes.py),
alternating which runs first. Reported per setting: runs, runs that ended non-finite (NaN rate),
optimizer steps applied, max KL per volume, guard events.

    python benchmarks/torture.py                       # full grid, 2 seeds, 30 steps (GPU if present)
    python benchmarks/torture.py --quick               # fp32/bf16 only, 1 seed, 10 steps
    python benchmarks/torture.py --json benchmarks/out/torture.json
    python benchmarks/torture.py --precisions fp32 bf16 --seeds 1 --crop 16   # what a shared 2-core CPU affords

"Naive" is MONAI's AutoencoderKL with L1 + kl_weight * KL, Adam, plain autocast (fp16 without a
grad scaler), no clipping, no annealing (benchmarks/naive_loop.py). "medvae" is `medvae train`
with its defaults except: kl_schedule=constant, kl_weight as set, lr as set, warmup_steps=5 (so the
peak LR is reached within the run), precision as set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_loop import naive_monai_run  # noqa: E402
from real_volumes import mni_crops, to_hounsfield_scale, write_nifti_folder  # noqa: E402


def medvae_run(folder: Path, out: Path, *, steps: int, lr: float, kl_weight: float, precision: str, seed: int,
               crop: int = 32) -> dict:
    from accelerate.state import AcceleratorState

    from medvae.config import load_config
    from medvae.train.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, many runs
    config = load_config(None, [
        f"data.train={folder}", "data.val_fraction=0", f"data.patch_size=[{crop},{crop},{crop}]", "data.batch_size=1",
        "data.intensity.preset=none", "data.modality=CT", "data.augment.intensity_prob=0.0",
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.lr={lr}", "train.warmup_steps=5",
        f"train.mixed_precision={'no' if precision == 'fp32' else precision}", f"train.seed={seed}", "train.val_every=0",
        f"train.checkpoint_every={steps}", "loss.kl_schedule=constant", f"loss.kl_weight={kl_weight}",
        "tracking.wandb_mode=disabled", "tracking.log_every=1",
    ])
    result = train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/step_applied" in r]
    events_file = out / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    finite_weights = all(torch.isfinite(p).all() for p in result.model.parameters())
    kls = [float(r["train/kl"]) for r in rows if isinstance(r["train/kl"], (int, float))]
    return {
        "diverged": not finite_weights or not math.isfinite(float(rows[-1]["train/loss"] if isinstance(rows[-1]["train/loss"], (int, float)) else "nan")),
        "steps_applied": int(sum(r["train/step_applied"] for r in rows)),
        "max_kl": max((k for k in kls if math.isfinite(k)), default=float("nan")),
        "events": len(events),
        "acted_on": sum(e["action"] != "record" for e in events),
        "event_kinds": sorted({e["kind"] for e in events}),
        "final_loss": rows[-1]["train/loss"],
    }


def naive_run(crops: list[torch.Tensor], *, steps: int, lr: float, kl_weight: float, precision: str, seed: int,
              device: str) -> dict:
    volumes = torch.stack([c[None] for c in crops])
    run = naive_monai_run(volumes, steps=steps, lr=lr, kl_weight=kl_weight, precision=precision, seed=seed,
                          device=device)
    finite_kls = [k for k in run.kls if math.isfinite(k)]
    return {
        "diverged": not run.weights_finite or not math.isfinite(run.losses[-1]),
        "steps_applied": run.steps_applied if run.weights_finite else (run.first_nonfinite_step or 0),
        "max_kl": max(finite_kls, default=float("nan")),
        "events": 0,
        "first_nonfinite_step": run.first_nonfinite_step,
        "final_loss": run.losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="fp32 and bf16, 1 seed, 10 steps")
    parser.add_argument("--crop", type=int, default=32, help="crop side in voxels (16 fits a shared CPU)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--systems", nargs="+", default=["naive", "medvae"], choices=("naive", "medvae"))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "torture.json")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.precisions = 1, 10, ["bf16", "fp32"]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    normalised = [torch.from_numpy(c) for c in mni_crops(4, args.crop, seed=0)]
    hounsfield = [torch.from_numpy(to_hounsfield_scale(c.numpy())) for c in normalised]
    work = Path(tempfile.mkdtemp(prefix="medvae-torture-"))
    folders = {"HU": write_nifti_folder([c.numpy() for c in hounsfield], work / "hu"),
               "norm": write_nifti_folder([c.numpy() for c in normalised], work / "norm")}
    crops = {"HU": hounsfield, "norm": normalised}

    results = []
    grid = list(itertools.product(args.precisions, args.lrs, ["HU", "norm"], [1.0, 1e-6]))
    for index, (precision, lr, data, kl_weight) in enumerate(grid):
        for seed in range(args.seeds):
            order = ["naive", "medvae"] if (index + seed) % 2 == 0 else ["medvae", "naive"]  # alternate
            order = [system for system in order if system in args.systems]
            for system in order:
                started = time.perf_counter()
                if system == "naive":
                    row = naive_run(crops[data], steps=args.steps, lr=lr, kl_weight=kl_weight, precision=precision,
                                    seed=seed, device=device)
                else:
                    row = medvae_run(folders[data], work / f"run-{index}-{seed}", steps=args.steps, lr=lr,
                                     kl_weight=kl_weight, precision=precision, seed=seed, crop=args.crop)
                row.update(system=system, precision=precision, lr=lr, input=data, kl_weight=kl_weight, seed=seed,
                           seconds=round(time.perf_counter() - started, 1))
                results.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n| precision | lr | input | KL weight | system | runs | NaN rate | steps applied (median of {args.steps}) "
          "| max KL per volume (median) | guard events (total, acted-on) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision, lr, data, kl_weight in grid:
        for system in args.systems:
            rows = [r for r in results if (r["precision"], r["lr"], r["input"], r["kl_weight"], r["system"])
                    == (precision, lr, data, kl_weight, system)]
            nan_rate = sum(r["diverged"] for r in rows) / len(rows)
            kls = [r["max_kl"] for r in rows if math.isfinite(r["max_kl"])]
            print(f"| {precision} | {lr:g} | {data} | {kl_weight:g} | {system} | {len(rows)} | {nan_rate:.0%} | "
                  f"{statistics.median(r['steps_applied'] for r in rows):g} | "
                  f"{statistics.median(kls) if kls else float('nan'):.3g} | {sum(r['events'] for r in rows)}, "
                  f"{sum(r.get('acted_on', 0) for r in rows)} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device, "steps": args.steps, "seeds": args.seeds,
                                     "torch": torch.__version__, "results": results}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
