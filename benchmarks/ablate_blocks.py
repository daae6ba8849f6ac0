"""Measure each design choice of medvae's blocks by switching it off, one at a time.

Every variant runs the comparison architecture (channels (32, 64, 64), latent 3, 32 groups) on a
training step (forward, L1 + KL, backward, AdamW) in a fresh process, round-robin (order reversed
every other round) so that machine drift hits all variants alike. Variants that are not config
options are made by replacing one function or method of medvae in the worker process only:

  medvae               the shipped design
  monai                MONAI AutoencoderKL at the same architecture, for reference
  no_recompute         recompute_norm=False: plain GroupNorm -> SiLU -> Conv3d autograd (keeps 3 tensors)
  checkpoint_norm      the previous design: GroupNorm+SiLU under torch.utils.checkpoint, conv separate
  native_gn_backward   fused node, but PyTorch's native (channels-last) GroupNorm backward kernel
  full_size_backward   fused node, but its SiLU/GroupNorm backward in one piece, not in depth slabs
  interpolate_upsample nearest x2 with F.interpolate, then the 3x3x3 conv on the fine grid
  contiguous           channels_last=False (default memory format)
  torch_conv_dispatch  F.conv3d's own kernel choice (+ a layout copy) instead of calling oneDNN directly
  conv_skip            the 1x1 skip projection as nn.Conv3d instead of a matrix product
  out_of_place_add     residual add as h + skip(x) instead of in place
  autocast_heads       moments and output convs in the autocast dtype instead of float32
  block_checkpoint     gradient_checkpointing=True (recompute whole residual blocks)

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
    "checkpoint_norm",
    "native_gn_backward",
    "full_size_backward",
    "interpolate_upsample",
    "contiguous",
    "torch_conv_dispatch",
    "conv_skip",
    "out_of_place_add",
    "autocast_heads",
    "block_checkpoint",
)
OPTIONS = {
    "no_recompute": dict(recompute_norm=False),
    "contiguous": dict(channels_last=False),
    "block_checkpoint": dict(gradient_checkpointing=True),
}


def apply_variant(variant: str) -> None:
    """Patch medvae in this process so that it runs ``variant``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from medvae.models import blocks, vae

    fused = blocks.norm_silu_conv
    if variant == "checkpoint_norm":

        def checkpointed(x, norm, conv, float32=False):
            if torch.is_grad_enabled() and x.requires_grad:
                h = checkpoint(blocks._group_norm_silu, x, norm.num_groups, norm.weight, norm.bias, norm.eps, use_reentrant=False)
            else:
                h = norm(x)
            if float32:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return blocks.conv3d(h.float(), conv)
            return blocks.conv3d(h, conv)

        blocks.norm_silu_conv = vae.norm_silu_conv = checkpointed
    elif variant == "native_gn_backward":

        def native(grad, x, mean, rstd, weight, bias, groups):
            b, c = x.shape[:2]
            t = blocks._group_norm_from_stats(x, mean, rstd, weight, bias, out=torch.empty_like(grad))
            g = torch.ops.aten.silu_backward(grad, t).to(x.dtype)
            return torch.ops.aten.native_group_norm_backward(g, x, mean, rstd, weight, b, c, x[0, 0].numel(), groups, [True] * 3)

        blocks._silu_group_norm_backward = native
    elif variant == "full_size_backward":
        blocks._slabs = lambda x: [slice(0, x.shape[2])]
    elif variant == "torch_conv_dispatch":
        blocks._conv = lambda x, w, b, stride, padding: F.conv3d(x, w, b, stride, padding).contiguous(
            memory_format=blocks._suggested_format(x)
        )
    elif variant == "conv_skip":
        blocks.pointwise_conv = lambda x, conv: blocks.conv3d(x, conv)
    elif variant == "interpolate_upsample":
        blocks.Upsample.forward = lambda self, x: blocks.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"), self.conv)
    elif variant == "out_of_place_add":

        def forward(self, x):
            h = blocks.norm_silu_conv(x, self.norm1, self.conv1)
            h = blocks.norm_silu_conv(h, self.norm2, self.conv2)
            return h + (blocks.pointwise_conv(x, self.skip) if isinstance(self.skip, torch.nn.Conv3d) else x)

        blocks.ResBlock.forward = forward
    elif variant == "autocast_heads":
        vae.norm_silu_conv = lambda x, norm, conv, float32=False: fused(x, norm, conv, False)
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
