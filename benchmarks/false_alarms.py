"""False alarms of the divergence guard on healthy runs of real anatomy: guard actions per 1,000 steps.

A healthy run is `medvae train` with every loss, optimiser and guard setting at its default, on the
MNI ICBM152 2009a T1 template (nilearn, installed, offline) at 1 mm or 2 mm, random crops, batch 1.
Nothing is wrong with these runs, so every acted-on guard event (skip, lower_lr, rollback, abort) is a
false alarm. Next to medvae's guard, the same run's logged numbers are replayed through the old rule
that sabotaged such runs (``kl_spike``: KL per element above 10 x max(median, 1 nat) of the last 50
steps, rollback and LR halving), to show what it would have done.

    python benchmarks/false_alarms.py                                  # 1 mm, 64^3, fp32, 300 steps, seed 0
    python benchmarks/false_alarms.py --precision bf16 --steps 300
    python benchmarks/false_alarms.py --spacing 2 --crop 32 --steps 600 --seeds 0 1
    python benchmarks/false_alarms.py --json benchmarks/out/false_alarms.json

Each run's metrics.jsonl and events.jsonl stay in --work (default: a temporary folder) for replays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mni_file(spacing: int, folder: Path) -> Path:
    """The raw nilearn template at ``spacing`` mm as a NIfTI file (medvae normalises it itself)."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"mni152_2009a_{spacing}mm.nii.gz"
    if not path.exists():
        nib.save(load_mni152_template(resolution=spacing), path)
    return path


def healthy_run(volume: Path, out: Path, *, crop: int, steps: int, precision: str, seed: int,
                overrides: list[str]) -> dict:
    """One default `medvae train` run in this process; its guard events and logged rows."""
    from accelerate.state import AcceleratorState

    from medvae.config import load_config
    from medvae.train.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, many runs
    config = load_config(None, [
        f"data.train={volume.parent}", "data.val_fraction=0", f"data.patch_size=[{crop},{crop},{crop}]",
        "data.batch_size=1",  # one crop per step: the setting, and the noisiest step-to-step statistics
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.mixed_precision={precision}",
        f"train.seed={seed}", "train.val_every=0", f"train.checkpoint_every={steps}",
        "tracking.wandb_mode=disabled", "tracking.log_every=1", *overrides,
    ])
    started = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/step_applied" in r]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    return {"rows": rows, "events": events, "seconds": seconds}


def old_kl_spike_rule(rows: list[dict]) -> int:
    """Steps the old guard would have acted on: KL per element > 10 x max(median of the last 50 good
    steps, 1 nat), after 10 steps of history (its defaults). Replayed on the logged numbers."""
    history: deque[float] = deque(maxlen=50)
    acted = 0
    for row in rows:
        kl = row.get("train/kl_per_element")
        if not isinstance(kl, (int, float)):
            continue
        if len(history) >= 10 and kl > max(statistics.median(history), 1.0) * 10.0:
            acted += 1
        else:
            history.append(kl)
    return acted


def replay_guard(rows: list[dict], overrides: list[str] = ()) -> list:
    """The events medvae's guard (defaults, plus ``train.guard.*`` overrides) raises on a logged run
    (log_every=1). Exact up to its first acted-on event: until then the guard only watched, so a
    guarded run is the same run."""
    from medvae.config import load_config
    from medvae.train.guard import DivergenceGuard

    guard = DivergenceGuard(load_config(None, list(overrides)).train.guard)
    events = []
    for row in rows:
        terms = {k.split("/", 2)[2]: _number(v) for k, v in row.items() if k.startswith("train/term/")}
        channels = sorted((k for k in row if k.startswith("train/kl_per_channel/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        events += guard.check(step=row["step"] - 1, loss=_number(row["train/loss"]), terms=terms,
                              primary_term="reconstruction", grad_norm=_number(row["train/grad_norm"]),
                              kl_per_channel=[_number(row[k]) for k in channels] or None)
    return events


def _number(value) -> float:
    return float(value)  # metrics.jsonl writes non-finite numbers as "nan"/"inf" strings; float() reads them


def summarise(run: dict, spacing: int, crop: int, precision: str, seed: int, steps: int) -> dict:
    acted = [e for e in run["events"] if e["action"] != "record"]
    rows = run["rows"]
    recon = [r["train/term/reconstruction"] for r in rows if isinstance(r.get("train/term/reconstruction"), float)]
    old = old_kl_spike_rule(rows)
    return {
        "spacing_mm": spacing, "crop": crop, "precision": precision, "seed": seed, "steps": steps,
        "acted_on_events": len(acted), "acted_per_1000_steps": 1000.0 * len(acted) / steps,
        "recorded_events": len(run["events"]) - len(acted),
        "event_kinds": sorted({e["kind"] for e in run["events"]}),
        "steps_applied": int(sum(r["train/step_applied"] for r in rows)),
        "final_lr_scale": rows[-1]["train/lr_scale"],
        "reconstruction_first_20": statistics.median(recon[:20]) if recon else None,
        "reconstruction_last_20": statistics.median(recon[-20:]) if recon else None,
        "max_kl_per_element": max((r["train/kl_per_element"] for r in rows
                                   if isinstance(r.get("train/kl_per_element"), float)), default=None),
        "old_kl_spike_rule_per_1000_steps": 1000.0 * old / steps,
        "seconds_per_step": run["seconds"] / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=int, default=1, choices=(1, 2), help="template resolution, mm")
    parser.add_argument("--crop", type=int, default=64, help="random crop side, voxels")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value settings (e.g. train.guard.enabled=false to record a raw trajectory)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and the run folders")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "false_alarms.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medvae-false-alarms-"))
    volume = mni_file(args.spacing, work / f"data_{args.spacing}mm")

    results = []
    for seed in args.seeds:
        name = f"run_{args.spacing}mm_{args.crop}_{args.precision}_seed{seed}"
        run = healthy_run(volume, work / name, crop=args.crop, steps=args.steps, precision=args.precision, seed=seed,
                          overrides=args.override)
        results.append(summarise(run, args.spacing, args.crop, args.precision, seed, args.steps))
        print(json.dumps(results[-1]), flush=True)

    print("\nguard actions per 1,000 healthy steps (MNI152 2009a, default recipe, batch 1)")
    print("| spacing | crop | precision | seed | steps | acted-on (per 1,000) | old kl_spike rule (per 1,000) "
          "| steps applied | final LR scale | rec. first/last 20 (median) | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['spacing_mm']} mm | {r['crop']}^3 | {r['precision']} | {r['seed']} | {r['steps']} "
              f"| {r['acted_on_events']} ({r['acted_per_1000_steps']:.1f}) | {r['old_kl_spike_rule_per_1000_steps']:.1f} "
              f"| {r['steps_applied']} | {r['final_lr_scale']:.3g} "
              f"| {r['reconstruction_first_20']:.4f} / {r['reconstruction_last_20']:.4f} | {r['seconds_per_step']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.json.read_text()) if args.json.exists() else []
    args.json.write_text(json.dumps(existing + results, indent=1))
    print(f"\nwork folder: {work}\nappended to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
