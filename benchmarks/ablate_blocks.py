"""Measure each design choice of medvae's blocks by switching it off, one at a time.

Every variant runs the comparison architecture (channels (32, 64, 64), latent 3, 32 groups) on a
training step (forward, L1 + KL, backward, AdamW) in a fresh process, round-robin (order reversed
every other round) so that machine drift hits all variants alike. Variants are config options, the
CI-visible reference switch, or one replaced kernel function of ``medvae.models.kernels`` in the
worker process only (the op list and the executor stay as shipped):

  medvae               the shipped design
  monai                MONAI AutoencoderKL at the same architecture, for reference
  no_recompute         recompute_norm=False: Norm, Activation, Conv as plain autograd (keeps 3 tensors)
  reference_kernels    MEDVAE_REFERENCE_KERNELS=1: F.conv3d, interpolate + conv upsampling, 1x1 conv
                       skip, no fused norm+act+conv node (everything from torch.nn.functional)
  interpolate_upsample only the upsampling from the reference set (F.interpolate, then the 3x3x3 conv)
  torch_conv_dispatch  only the convolutions from the reference set (F.conv3d instead of oneDNN directly)
  contiguous           channels_last=False (default memory format)
  block_checkpoint     gradient_checkpointing=True (recompute every residual segment)

    python benchmarks/ablate_blocks.py --size 64 --modes fp32 bf16 --rounds 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_monai  # noqa: E402  (sibling script: model builders and the timing worker)

VARIANTS = (
    "medvae",
    "monai",
    "no_recompute",
    "reference_kernels",
    "interpolate_upsample",
    "torch_conv_dispatch",
    "contiguous",
    "block_checkpoint",
)
OPTIONS = {
    "no_recompute": dict(recompute_norm=False),
    "contiguous": dict(channels_last=False),
    "block_checkpoint": dict(gradient_checkpointing=True),
}


def apply_variant(variant: str) -> None:
    """Switch medvae in this process to ``variant`` (see the module docstring)."""
    import os

    import torch.nn.functional as F

    from medvae.models import kernels

    if variant == "reference_kernels":
        os.environ["MEDVAE_REFERENCE_KERNELS"] = "1"
    elif variant == "interpolate_upsample":
        def upsample_conv(x, weight, bias, padding):
            if padding:
                x = F.pad(x, [1] * 6)
            return F.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias)[:, :, 1:-1, 1:-1, 1:-1]

        kernels.upsample_conv = upsample_conv
    elif variant == "torch_conv_dispatch":
        kernels.conv3d = lambda x, weight, bias, stride, padding: F.conv3d(x, weight, bias, stride, padding)
    elif variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def spawn(variant: str, size: int, mode: str, repeats: int, warmup: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, str(size), mode,
           "--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {variant} {size} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "ablate_blocks.json")
    args = parser.parse_args(argv)

    if args.worker:
        variant, size, mode = args.worker
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        apply_variant(variant)
        model = "monai" if variant == "monai" else "medvae"
        result = compare_monai.run_worker(model, "train", int(size), mode, args.repeats, args.warmup, **OPTIONS.get(variant, {}))
        print(json.dumps(result))
        return

    payload = {"command": "python benchmarks/ablate_blocks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "size": args.size, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    for mode in args.modes:
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            for variant in args.variants if r % 2 == 0 else reversed(args.variants):
                runs[variant].append(spawn(variant, args.size, mode, args.repeats, args.warmup, args.threads))
                print(f"  {mode} round {r} {variant}: {[round(t, 2) for t in runs[variant][-1]['times']]}", flush=True)
        reference = statistics.median(t for run in runs["medvae"] for t in run["times"])
        for variant in args.variants:
            times = [t for run in runs[variant] for t in run["times"]]
            row = {
                "variant": variant,
                "mode": mode,
                "median_s": statistics.median(times),
                "cpu_s": statistics.median(c for run in runs[variant] for c in run["cpu"]),
                "peak_mb": max(run["peak_mb"] for run in runs[variant]),
                "working_set_mb": max(run["peak_mb"] - run["baseline_mb"] for run in runs[variant]),
                "finite": all(run["finite"] for run in runs[variant]),
                "times": times,
            }
            row["time_vs_medvae"] = row["median_s"] / reference
            payload["rows"].append(row)
        compare_monai.write_json(args.out, payload)
    print(f"\n| variant | mode | s/step ({args.size}³) | vs medvae | CPU s | peak MB | working set MB |")
    print("|---|---|---|---|---|---|---|")
    for row in payload["rows"]:
        print(f"| {row['variant']} | {row['mode']} | {row['median_s']:.2f} | {row['time_vs_medvae']:.2f} | {row['cpu_s']:.2f} "
              f"| {row['peak_mb']:.0f} | {row['working_set_mb']:.0f} |")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
