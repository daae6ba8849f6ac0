"""Training-step time and peak GPU memory: medvae.VAE3D against MONAI's AutoencoderKL on CUDA.

Same comparison architecture and step as benchmarks/compare_monai.py (forward, L1 + KL, backward,
AdamW step), in fp32, bf16 autocast and fp16 autocast with a GradScaler, alternating the two models
(A B A B) and reporting medians. Peak memory is torch.cuda.max_memory_allocated over the timed steps.

    python benchmarks/gpu_speed.py --sizes 64 96 128 --repeats 10 --json benchmarks/out/gpu_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_monai import build_model, forward_train  # noqa: E402


def step_fn(name: str, mode: str, size: int):
    model = build_model(name).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    x = torch.rand(1, 1, size, size, size, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            reconstruction, posterior = forward_train(model, name, x)
        loss = (reconstruction.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step


def measure(name: str, mode: str, size: int, repeats: int, warmup: int) -> dict:
    torch.cuda.empty_cache()
    step = step_fn(name, mode, size)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"times_ms": [t * 1e3 for t in times], "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="A B A B rounds per configuration")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "gpu_speed.json")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    rows = []
    for size in args.sizes:
        for mode in args.modes:
            runs: dict[str, list[dict]] = {"medvae": [], "monai": []}
            for _ in range(args.rounds):
                for name in ("medvae", "monai"):
                    runs[name].append(measure(name, mode, size, args.repeats, args.warmup))
            row = {"size": size, "mode": mode}
            for name, results in runs.items():
                row[f"{name}_ms"] = statistics.median(t for r in results for t in r["times_ms"])
                row[f"{name}_peak_mb"] = max(r["peak_mb"] for r in results)
            row["speedup"] = row["monai_ms"] / row["medvae_ms"]
            row["memory_ratio"] = row["medvae_peak_mb"] / row["monai_peak_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{torch.cuda.get_device_name()} , torch {torch.__version__}")
    print("| size | mode | medvae ms/step | MONAI ms/step | MONAI/medvae time | medvae peak MB | MONAI peak MB | medvae/MONAI memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}^3 | {r['mode']} | {r['medvae_ms']:.1f} | {r['monai_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['medvae_peak_mb']:.0f} | {r['monai_peak_mb']:.0f} | {r['memory_ratio']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
