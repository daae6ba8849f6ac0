"""Steps to a reconstruction quality on real anatomy: medvae's defaults against the peers' recipe.

Both train the comparison architecture (channels 32/64/64, one res block, latent 3, 32 groups) on
64^3 crops from the left half of the MNI ICBM152 T1 template at 1 mm and are scored on held-out
crops from the right half: PSNR (data range 1) of the posterior-mean reconstruction, every
``--eval-every`` steps. "peers" is MONAI's AutoencoderKL with the MONAI-tutorial recipe (Adam,
L1 + 1e-6 * KL summed over the latent, no clipping) at several learning rates; "medvae" is
`medvae train` with its defaults at several learning rates.

    python benchmarks/convergence.py --steps 400 --json benchmarks/out/convergence.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_loop import monai_autoencoder  # noqa: E402
from real_volumes import mni_t1, write_nifti_folder  # noqa: E402

CROP = 64


def split_crops(count_train: int, count_val: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train crops from the left half of the head (x < midline), held-out crops from the right half."""
    volume = mni_t1()
    mid = volume.shape[0] // 2
    rng = np.random.default_rng(seed)

    def crops(x_range: tuple[int, int], count: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        while len(out) < count:
            x0 = int(rng.integers(*x_range))
            y0, z0 = (int(rng.integers(0, s - CROP + 1)) for s in volume.shape[1:])
            crop = volume[x0:x0 + CROP, y0:y0 + CROP, z0:z0 + CROP]
            if crop.shape == (CROP,) * 3 and crop.mean() > 0.25:
                out.append(np.ascontiguousarray(crop))
        return out

    return crops((0, mid - CROP), count_train), crops((mid, volume.shape[0] - CROP), count_val)


@torch.no_grad()
def heldout_psnr(reconstruct, val: list[torch.Tensor]) -> float:
    from monai.metrics import PSNRMetric

    metric = PSNRMetric(max_val=1.0)
    for x in val:
        metric(reconstruct(x).float().clamp(0, 1), x)
    return float(metric.aggregate().item())


def peer_run(train: list[torch.Tensor], val: list[torch.Tensor], *, lr: float, steps: int, eval_every: int,
             device: str, precision: str, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = monai_autoencoder().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    curve = []

    def reconstruct(x):
        model.eval()
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            z_mu, _ = model.encode(x)
            out = model.decode(z_mu)
        model.train()
        return out

    for step in range(1, steps + 1):
        x = train[(step - 1) % len(train)]
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            recon, mu, sigma = model(x)
        kl = 0.5 * torch.sum(mu.float() ** 2 + sigma.float() ** 2 - torch.log(sigma.float() ** 2) - 1, dim=[1, 2, 3, 4])
        loss = (recon.float() - x).abs().mean() + 1e-6 * kl.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            finite = math.isfinite(float(loss))
            psnr = heldout_psnr(reconstruct, val) if finite else float("nan")
            curve.append({"step": step, "loss": float(loss), "val_psnr": psnr})
    return curve


def medvae_run(train_dir: Path, val_dir: Path, out: Path, *, lr: float, steps: int, eval_every: int,
               precision: str, seed: int = 0) -> list[dict]:
    from accelerate.state import AcceleratorState

    from medvae.config import load_config
    from medvae.train.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    config = load_config(None, [
        f"data.train={train_dir}", f"data.val={val_dir}", f"data.patch_size=[{CROP},{CROP},{CROP}]",
        "data.batch_size=1", "data.intensity.preset=none", "data.augment.intensity_prob=0.0",
        f"train.output_dir={out}", f"train.max_steps={steps}",
        f"train.lr={lr}", f"train.val_every={eval_every}", f"train.checkpoint_every={steps}",
        f"train.mixed_precision={'no' if precision == 'fp32' else precision}", f"train.seed={seed}",
        "tracking.wandb_mode=disabled", f"tracking.log_every={eval_every}",
    ])
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(row)
    return [{"step": s, "loss": r.get("train/loss"), "val_psnr": r["val/psnr"]}
            for s, r in sorted(by_step.items()) if "val/psnr" in r]


def steps_to(curve: list[dict], target: float) -> int | None:
    for point in curve:
        if isinstance(point["val_psnr"], float) and point["val_psnr"] >= target:
            return point["step"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--peer-lrs", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3])
    parser.add_argument("--medvae-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--targets", type=float, nargs="+", default=[20.0, 22.0, 24.0])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "convergence.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    train_np, val_np = split_crops(8, 4)
    train_t = [torch.from_numpy(c)[None, None].to(device) for c in train_np]
    val_t = [torch.from_numpy(c)[None, None].to(device) for c in val_np]
    work = Path(tempfile.mkdtemp(prefix="medvae-convergence-"))
    train_dir, val_dir = write_nifti_folder(train_np, work / "train"), write_nifti_folder(val_np, work / "val", prefix="heldout")

    runs = []
    jobs = [("peers", lr) for lr in args.peer_lrs] + [("medvae", lr) for lr in args.medvae_lrs]
    # alternate systems so drift hits both alike
    jobs = [j for pair in zip(jobs[::2], jobs[1::2]) for j in pair] + (jobs[-1:] if len(jobs) % 2 else [])
    for system, lr in jobs:
        started = time.perf_counter()
        if system == "peers":
            curve = peer_run(train_t, val_t, lr=lr, steps=args.steps, eval_every=args.eval_every, device=device,
                             precision=args.precision)
        else:
            curve = medvae_run(train_dir, val_dir, work / f"medvae-{lr:g}", lr=lr, steps=args.steps,
                               eval_every=args.eval_every, precision=args.precision)
        runs.append({"system": system, "lr": lr, "curve": curve, "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(runs[-1]), flush=True)

    header = " | ".join(f"steps to {t:g} dB" for t in args.targets)
    print(f"\n| system | lr | final held-out PSNR (dB) | best | {header} | seconds |")
    print("|---|---|---|---|" + "---|" * len(args.targets) + "---|")
    for run in runs:
        psnrs = [p["val_psnr"] for p in run["curve"]]
        finite = [p for p in psnrs if isinstance(p, float) and math.isfinite(p)]
        reached = " | ".join(str(steps_to(run["curve"], t) or "-") for t in args.targets)
        print(f"| {run['system']} | {run['lr']:g} | {psnrs[-1]:.2f} | {max(finite, default=float('nan')):.2f} | "
              f"{reached} | {run['seconds']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": device, "precision": args.precision, "steps": args.steps,
                                     "torch": torch.__version__, "runs": runs}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
