"""Training-step time and peak GPU memory: medvae.VAE3D against MONAI's AutoencoderKL on CUDA.

Same comparison architecture and step as benchmarks/compare_monai.py (forward, L1 + KL, backward,
AdamW step). Four parts, each written to the JSON as it finishes (a run cut short keeps what it has):

1. ``steps``: for every size x precision (fp32, bf16 autocast, fp16 autocast + GradScaler) x batch,
   medvae and MONAI alternate (A B A B, ``--rounds``), median step time and peak
   ``torch.cuda.max_memory_allocated``; ratios MONAI / medvae time and medvae / MONAI memory.
   Goal (issue 10): >= 1.5x MONAI's throughput at <= 0.6x its peak at 128^3 bf16.
2. ``candidates`` (at ``--candidate-size``, bf16, batch 1): medvae variants that are candidates for
   the CUDA norm+activation: the shipped fused node, plain autograd (recompute_norm=False),
   activation checkpointing, the reference kernels, and ``torch.compile`` of the whole model.
3. ``largest_crop``: the largest cubic crop (multiple of 16) each model trains at (bf16, batch 1)
   with peak memory within ``--memory-limit-gb`` (40 by default), found by bisection; an
   out-of-memory error counts as "does not fit".
4. ``roofline``: conv GFLOP per step (torch.utils.flop_counter, convolutions only) over step time,
   as a share of a plain 64->64 3x3x3 conv3d's rate on the same GPU (channels-last, cuDNN), per
   precision.

    python benchmarks/gpu_speed.py --json benchmarks/gpu_results/gpu_speed.json
    python benchmarks/gpu_speed.py --device cpu --sizes 16 --modes fp32 --batches 1 --rounds 1 \\
        --repeats 1 --warmup 0 --crop-sizes 16 32 --candidate-size 16 --roofline-size 16 \\
        --candidates "fused (shipped)" "plain autograd"     # logic check on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_monai import build_model, forward_train  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CANDIDATES = {
    "fused (shipped)": {},
    "plain autograd": {"recompute_norm": False},
    "activation checkpointing": {"gradient_checkpointing": True},
    "reference kernels": {"_reference": True},
    "torch.compile": {"_compile": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def make_step(name: str, mode: str, size: int, batch: int, device: torch.device, options: dict | None = None):
    """A closure running one training step of ``name`` at (batch, 1, size, size, size)."""
    options = dict(options or {})
    reference = options.pop("_reference", False)
    compile_model = options.pop("_compile", False)
    os.environ.pop("MEDVAE_REFERENCE_KERNELS", None)
    if reference:
        os.environ["MEDVAE_REFERENCE_KERNELS"] = "1"
    model = build_model(name, **options).to(device)
    forward_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = DTYPES[mode]
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    x = torch.rand(batch, 1, size, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            reconstruction, posterior = forward_train(forward_model, name, x)
        loss = (reconstruction.float() - x).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step, model, x


def measure(name, mode, size, batch, repeats, warmup, device, options=None) -> dict:
    """Median-ready step times (ms) and the peak memory (MB) over the timed steps, or the error."""
    _reset_memory(device)
    try:
        step, _, _ = make_step(name, mode, size, batch, device, options)
        for _ in range(warmup):
            step()
        _sync(device)
        _reset_memory(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            _sync(device)
            times.append((time.perf_counter() - started) * 1e3)
        return {"times_ms": times, "peak_mb": _peak_mb(device)}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as err:  # a candidate that fails (e.g. torch.compile) is a result, not a crash
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        os.environ.pop("MEDVAE_REFERENCE_KERNELS", None)
        _reset_memory(device)


def _median(results: list[dict]) -> float | None:
    times = [t for r in results if "times_ms" in r for t in r["times_ms"]]
    return statistics.median(times) if times else None


def _peak(results: list[dict]) -> float | None:
    peaks = [r["peak_mb"] for r in results if r.get("peak_mb") is not None]
    return max(peaks) if peaks else None


def _errors(results: list[dict]) -> list[str]:
    return sorted({r["error"] for r in results if "error" in r})


def part_steps(args, device, payload, save) -> None:
    for size in args.sizes:
        for mode in args.modes:
            for batch in args.batches:
                runs: dict[str, list[dict]] = {"medvae": [], "monai": []}
                for r in range(args.rounds):
                    for name in ("medvae", "monai") if r % 2 == 0 else ("monai", "medvae"):
                        runs[name].append(measure(name, mode, size, batch, args.repeats, args.warmup, device))
                row = {"size": size, "mode": mode, "batch": batch}
                for name, results in runs.items():
                    row[f"{name}_ms"], row[f"{name}_peak_mb"] = _median(results), _peak(results)
                    row[f"{name}_errors"] = _errors(results)
                if row["medvae_ms"] and row["monai_ms"]:
                    row["throughput_ratio"] = row["monai_ms"] / row["medvae_ms"]
                if row["medvae_peak_mb"] and row["monai_peak_mb"]:
                    row["memory_ratio"] = row["medvae_peak_mb"] / row["monai_peak_mb"]
                payload["steps"].append(row)
                print(json.dumps(row), flush=True)
                save()


def part_candidates(args, device, payload, save) -> None:
    runs: dict[str, list[dict]] = {c: [] for c in args.candidates}
    for r in range(args.rounds):
        for candidate in args.candidates if r % 2 == 0 else reversed(args.candidates):
            warmup = max(args.warmup, 3) if CANDIDATES[candidate].get("_compile") else args.warmup
            runs[candidate].append(measure("medvae", "bf16", args.candidate_size, 1, args.repeats, warmup, device,
                                           CANDIDATES[candidate]))
    for candidate, results in runs.items():
        row = {"candidate": candidate, "size": args.candidate_size, "mode": "bf16", "ms": _median(results),
               "peak_mb": _peak(results), "errors": _errors(results)}
        payload["candidates"].append(row)
        print(json.dumps(row), flush=True)
    save()


def fits(name: str, size: int, device: torch.device, limit_mb: float) -> bool:
    result = measure(name, "bf16", size, 1, 1, 1, device)
    return "times_ms" in result and (result["peak_mb"] is None or result["peak_mb"] <= limit_mb)


def part_largest_crop(args, device, payload, save) -> None:
    limit_mb = args.memory_limit_gb * 1024
    sizes = sorted(args.crop_sizes)
    for name in ("medvae", "monai"):
        low, high = -1, len(sizes)  # sizes[low] fits (or none), sizes[high] does not (or none tried)
        while high - low > 1:
            mid = (low + high) // 2
            if fits(name, sizes[mid], device, limit_mb):
                low = mid
            else:
                high = mid
        row = {"model": name, "largest_cubic_crop": sizes[low] if low >= 0 else None,
               "memory_limit_gb": args.memory_limit_gb, "searched": [sizes[0], sizes[-1]]}
        payload["largest_crop"].append(row)
        print(json.dumps(row), flush=True)
        save()


def _mkldnn_conv_flop(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def conv_flops(name: str, mode: str, size: int, device: torch.device) -> float:
    """Convolution FLOPs (forward + backward) of one training step, counted by torch.

    Counts the convolutions each model really runs: ``aten.convolution*`` and, on CPU, the direct
    ``aten.mkldnn_convolution`` calls (torch has no formula for them, so one is registered here),
    plus the matrix products that medvae's 1x1 convolutions are computed as (MONAI runs those as
    convolutions, so both models' 1x1 work is in the count).
    """
    from torch.utils.flop_counter import FlopCounterMode

    step, _, _ = make_step(name, mode, size, 1, device)
    onednn = getattr(torch.ops.aten, "mkldnn_convolution", None)  # absent from builds without oneDNN
    counter = FlopCounterMode(display=False, custom_mapping={onednn: _mkldnn_conv_flop} if onednn is not None else None)
    with counter:
        step()
    counted = ("convolution", "aten.mm", "aten.addmm", "aten.bmm")
    return float(sum(v for op, v in counter.get_flop_counts()["Global"].items() if any(c in str(op) for c in counted)))


def plain_conv_rate(mode: str, device: torch.device, size: int = 64, repeats: int = 10) -> float:
    """GFLOP/s of a plain 64->64 3x3x3 conv3d (forward) on a channels-last (1, 64, size^3) input."""
    dtype = DTYPES[mode] or torch.float32
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(device, memory_format=torch.channels_last_3d)
    x = torch.randn(1, 64, size, size, size, device=device).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=DTYPES[mode] is not None):
        for _ in range(3):
            conv(x)
        _sync(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            conv(x)
            _sync(device)
            times.append(time.perf_counter() - started)
    return 2 * 64 * 64 * 27 * size**3 / statistics.median(times) / 1e9


def part_roofline(args, device, payload, save) -> None:
    for mode in args.modes:
        ceiling = plain_conv_rate(mode, device)
        for name in ("medvae", "monai"):
            try:
                flops = conv_flops(name, mode, args.roofline_size, device)
            except torch.OutOfMemoryError:
                continue
            ms = _median([measure(name, mode, args.roofline_size, 1, args.repeats, args.warmup, device)])
            if ms is None:
                continue
            achieved = flops / (ms / 1e3) / 1e9
            row = {"model": name, "mode": mode, "size": args.roofline_size, "conv_gflop_per_step": flops / 1e9,
                   "step_ms": ms, "achieved_gflops": achieved, "plain_conv_gflops": ceiling, "share": achieved / ceiling}
            payload["roofline"].append(row)
            print(json.dumps(row), flush=True)
            save()


def render(payload: dict) -> str:
    lines = [f"{payload['device']}, torch {payload['torch']}", "",
             "| size | mode | batch | medvae ms/step | MONAI ms/step | MONAI/medvae time | medvae peak MB | MONAI peak MB | medvae/MONAI memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in payload["steps"]:
        lines.append(f"| {r['size']}³ | {r['mode']} | {r['batch']} | {fmt(r['medvae_ms'], '.1f')} | {fmt(r['monai_ms'], '.1f')} | "
                     f"{fmt(r.get('throughput_ratio'), '.2f')}x | {fmt(r['medvae_peak_mb'], '.0f')} | "
                     f"{fmt(r['monai_peak_mb'], '.0f')} | {fmt(r.get('memory_ratio'), '.2f')} |")
    if payload["candidates"]:
        lines += ["", "| candidate (medvae, bf16, batch 1) | size | ms/step | peak MB | errors |", "|---|---|---|---|---|"]
        for r in payload["candidates"]:
            lines.append(f"| {r['candidate']} | {r['size']}³ | {fmt(r['ms'], '.1f')} | {fmt(r['peak_mb'], '.0f')} | {'; '.join(r['errors'])} |")
    if payload["largest_crop"]:
        lines += ["", "| model | largest cubic crop (bf16, batch 1) | memory limit GB |", "|---|---|---|"]
        for r in payload["largest_crop"]:
            lines.append(f"| {r['model']} | {r['largest_cubic_crop']}³ | {r['memory_limit_gb']} |")
    if payload["roofline"]:
        lines += ["", "| model | mode | size | conv GFLOP/step | ms/step | achieved GFLOP/s | plain conv3d GFLOP/s | share |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in payload["roofline"]:
            lines.append(f"| {r['model']} | {r['mode']} | {r['size']}³ | {r['conv_gflop_per_step']:.0f} | {r['step_ms']:.1f} | "
                         f"{r['achieved_gflops']:.0f} | {r['plain_conv_gflops']:.0f} | {r['share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 160])
    parser.add_argument("--modes", nargs="+", default=["bf16", "fp32", "fp16"], choices=list(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per configuration (order alternates)")
    parser.add_argument("--parts", nargs="+", default=["steps", "candidates", "largest_crop", "roofline"])
    parser.add_argument("--candidate-size", type=int, default=128)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=list(range(128, 417, 16)))
    parser.add_argument("--memory-limit-gb", type=float, default=40.0)
    parser.add_argument("--roofline-size", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "gpu_results" / "gpu_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    payload = {"device": name, "torch": torch.__version__, "command": " ".join(sys.argv),
               "steps": [], "candidates": [], "largest_crop": [], "roofline": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.json)

    parts = {"steps": part_steps, "candidates": part_candidates, "largest_crop": part_largest_crop, "roofline": part_roofline}
    for part in args.parts:
        started = time.perf_counter()
        parts[part](args, device, payload, save)
        print(f"--- {part}: {time.perf_counter() - started:.0f} s", flush=True)
    print(render(payload))


if __name__ == "__main__":
    main()
