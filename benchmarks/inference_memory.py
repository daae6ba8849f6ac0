"""Peak memory and time of whole-volume encode and decode on CPU: memory-bounded vs one pass vs MONAI.

    python benchmarks/inference_memory.py --skip 512:sliding_window   # 128^3-512^3, ~1.5 h on 2 cores
    python benchmarks/inference_memory.py --sizes 128 --budgets 128:0.25   # ~5 min
    python benchmarks/inference_memory.py --resume ...   # reuse rows saved by an earlier run

Model: the comparison architecture, VAE3D(channels=(32, 64, 64), num_res_blocks=1,
latent_channels=3, norm_num_groups=32), every parameter perturbed (weights by 0.5 / sqrt(fan-in)
* randn, vectors by 0.05 * randn) so the zero-initialised convolutions take part. Input: the MNI152
T1 template (nilearn, 1 mm), scaled to [-1, 1] and resized (trilinear) to size^3. Methods, each part
(encode, decode) in a fresh process:

- ``bounded``: medvae.inference.encode_volume / decode_volume with the size's budget (--budgets).
- ``one_pass``: model.encode / model.decode; skipped where its estimate exceeds --one-pass-limit-gib.
- ``one_pass_contiguous``: model.encode / model.decode of the same weights in the contiguous memory
  format (channels_last=False): PyTorch's channels-last CPU GroupNorm kernel loses precision on
  large groups, the contiguous one does not.
- ``one_pass_float64``: the model in float64, encode only (at --float64-sizes): the exact reference.
  (PyTorch runs float64 conv3d as im2col + GEMM: 17 GiB peak for the 128^3 encoder.)
- ``sliding_window``: monai.inferers.sliding_window_inference, roi 96^3 voxels (24^3 latent), overlap
  0.25, gaussian blending; encode predicts the posterior mean, decode the voxels.

Peak memory is the process's peak resident set (VmHWM, reset just before the call) minus its
resident set before the call (model, input and libraries loaded, one small warm-up run done).
Decoders all decode the latent of the bounded encoder. Max abs differences are against the float32
one pass, the contiguous-layout one pass and, where run, the float64 one pass.
Writes benchmarks/out/inference_memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
CACHE = OUT / "inference_memory_cache"
ARCH = dict(channels=(32, 64, 64), num_res_blocks=1, latent_channels=3, norm_num_groups=32)
ROI = 96
GIB = 2**30


def _status(field: str) -> int:
    """A memory field of /proc/self/status in bytes (VmRSS: now; VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set (Linux >= 4.0)
        f.write("5")


def build_model(channels_last: bool = True):
    """The perturbed comparison model; the same weights in either memory format."""
    from medvae.models import VAE3D

    torch.manual_seed(0)
    model = VAE3D(**ARCH).eval()
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.05
            p.add_(scale * torch.randn_like(p))
    if not channels_last:  # (randn_like fills in memory order: copy the values, not the seed)
        contiguous = VAE3D(**ARCH, channels_last=False).eval()
        contiguous.load_state_dict(model.state_dict())
        model = contiguous
    return model


def make_volume(size: int) -> torch.Tensor:
    """(1, 1, size, size, size) MNI152 T1 in [-1, 1]."""
    import torch.nn.functional as F
    from nilearn.datasets import load_mni152_template

    data = torch.from_numpy(load_mni152_template(resolution=1).get_fdata().astype("float32"))
    data = (data - data.min()) / (data.max() - data.min()) * 2 - 1
    return F.interpolate(data[None, None], size=(size,) * 3, mode="trilinear", align_corners=False)


def _cache(part: str, method: str, size: int) -> Path:
    return CACHE / f"{part}_{method}_{size}.pt"


def worker(config: dict) -> dict:
    """Run one (size, method, part) and measure it; save the output for later comparison."""
    from monai.inferers import sliding_window_inference

    from medvae.inference import decode_volume, encode_volume, estimate_one_pass_bytes, plan_decode, plan_encode
    from medvae.inference import model_geometry

    size, method, part, budget = config["size"], config["method"], config["part"], config["budget"]
    model = build_model(channels_last=method != "one_pass_contiguous")
    f = model.downsampling_factor
    if part == "encode":
        data = make_volume(size)
    else:
        data = torch.load(_cache("latent", "bounded", size), weights_only=True)
    with torch.no_grad():  # warm-up: load kernels and thread pools outside the measurement
        small = torch.zeros(1, data.shape[1], 16, 16, 16)
        model.encode(small) if part == "encode" else model.decode(small[:, :, :4, :4, :4])
    gc.collect()
    result = dict(config)
    shape = tuple(data.shape)
    if method == "one_pass_float64":
        model, data = model.double(), data.double()
    if method == "bounded":
        plan = (plan_encode if part == "encode" else plan_decode)(model, shape, budget)
        result["estimate_bytes"] = plan.peak_bytes
        result["passes"] = len(plan.passes)
        result["one_pass_chosen"] = plan.one_pass
    elif method == "one_pass":
        geometry = model_geometry(model, "encoder" if part == "encode" else "decoder", shape)
        result["estimate_bytes"] = estimate_one_pass_bytes(geometry)
    baseline = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        if method == "bounded":
            if part == "encode":
                out = encode_volume(model, data, memory_budget=budget).mean
            else:
                out = decode_volume(model, data, memory_budget=budget)
        elif method in ("one_pass", "one_pass_contiguous", "one_pass_float64"):
            out = model.encode(data).mean if part == "encode" else model.decode(data)
        else:
            roi = ROI if part == "encode" else ROI // f
            predictor = (lambda p: model.encode(p).mean) if part == "encode" else model.decode
            out = sliding_window_inference(data, roi, 1, predictor, overlap=0.25, mode="gaussian")
    result["seconds"] = time.perf_counter() - start
    result["peak_bytes"] = _status("VmHWM") - baseline
    result["output_shape"] = list(out.shape)
    if part == "encode" or size <= 256:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(out.contiguous(), _cache(part, method, size))
        if method == "bounded" and part == "encode" and not _cache("latent", "bounded", size).exists():
            torch.save(out.float().contiguous(), _cache("latent", "bounded", size))  # what every decoder decodes
    return result


def _run_worker(config: dict, timeout: float, resume: bool) -> dict:
    """Measure one configuration in a fresh process (or reuse its saved result with ``resume``)."""
    saved = CACHE / f"{config['part']}_{config['method']}_{config['size']}.json"
    if resume and saved.exists() and json.loads(saved.read_text()).get("budget") == config["budget"]:
        return json.loads(saved.read_text())
    cmd = [sys.executable, __file__, "--worker", json.dumps(config)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(config, error=f"timed out after {timeout:.0f} s")
    if done.returncode != 0:
        return dict(config, error=done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    CACHE.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    return result


REFERENCES = (
    ("one_pass", "max_abs_diff_vs_one_pass"),
    ("one_pass_contiguous", "max_abs_diff_vs_contiguous"),
    ("one_pass_float64", "max_abs_diff_vs_float64"),
)


def _differences(results: list[dict]) -> None:
    """Max abs difference of each output against the one-pass outputs of the same size and part."""
    for r in results:
        mine = _cache(r["part"], r["method"], r["size"])
        for reference, key in REFERENCES:
            ref = _cache(r["part"], reference, r["size"])
            if "error" not in r and "skipped" not in r and ref.exists() and mine.exists() and r["method"] != reference:
                r[key] = (torch.load(mine, weights_only=True).double() - torch.load(ref, weights_only=True).double()).abs().max().item()


def table(results: list[dict]) -> str:
    lines = [
        "| size | part | method | budget GiB | estimate GiB | peak GiB | time s "
        "| max abs diff vs one pass | vs contiguous one pass | vs float64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gib = lambda key: f"{r[key] / GIB:.2f}" if r.get(key) is not None else "-"  # noqa: E731
        diff = lambda key: f"{r[key]:.1e}" if r.get(key) is not None else "-"  # noqa: E731
        if "error" in r or "skipped" in r:
            note = r.get("error") or r["skipped"]
            lines.append(
                f"| {r['size']}^3 | {r['part']} | {r['method']} | {gib('budget')} | {gib('estimate_bytes')} | - | - | {note} | | |"
            )
            continue
        lines.append(
            f"| {r['size']}^3 | {r['part']} | {r['method']} | {gib('budget')} | {gib('estimate_bytes')} | "
            f"{gib('peak_bytes')} | {r['seconds']:.1f} | {diff('max_abs_diff_vs_one_pass')} | "
            f"{diff('max_abs_diff_vs_contiguous')} | {diff('max_abs_diff_vs_float64')} |"
        )
    return "\n".join(lines)


def print_plan_flops(sizes: list[int], budgets: dict[int, float]) -> None:
    """Planned conv flops of the bounded encode/decode over those of one pass, per size and budget."""
    from medvae.inference import model_geometry
    from medvae.inference.planner import plan_volume

    model = build_model()
    f = model.downsampling_factor
    print("| size | budget GiB | encode plan / one pass | decode plan / one pass |\n|---|---|---|---|")
    for size in sizes:
        ratios = []
        for part, shape in (("encoder", (1, 1, size, size, size)), ("decoder", (1, 3, size // f, size // f, size // f))):
            g = model_geometry(model, part, shape, torch.device("cpu"))
            one = sum(step.flops_per_output_voxel(g.channels[g.block_of[i]] if i in g.block_of else 0) * math.prod(g.shapes[i + 1])
                      for i, step in enumerate(g.steps))
            ratios.append(plan_volume(g, budgets[size] * GIB, allow_one_pass=False).flops / one)
        print(f"| {size}³ | {budgets[size]:g} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--methods", nargs="+", default=["bounded", "one_pass", "one_pass_contiguous", "sliding_window"])
    parser.add_argument("--resume", action="store_true", help="reuse results saved by an earlier run")
    parser.add_argument("--skip", nargs="*", default=[], help="SIZE:METHOD configurations not to run (too slow here)")
    parser.add_argument("--parts", nargs="+", default=["encode", "decode"])
    parser.add_argument(
        "--budgets", nargs="+", default=["128:0.5", "256:2", "512:8"], help="SIZE:GIB budgets of the bounded path"
    )
    parser.add_argument("--one-pass-limit-gib", type=float, default=14.0, help="skip one pass above this estimate")
    parser.add_argument("--float64-sizes", type=int, nargs="*", default=[128], help="sizes with a float64 one-pass reference")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=OUT / "inference_memory.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plan-flops", action="store_true", help="only print the planner's conv flops vs one pass (seconds)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.plan_flops:
        print_plan_flops(args.sizes, {int(k): float(v) for k, v in (b.split(":") for b in args.budgets)})
        return

    from medvae.atomic import atomic_file
    from medvae.inference import estimate_one_pass_bytes
    from medvae.inference import model_geometry

    model = build_model()
    f = model.downsampling_factor
    budgets = {int(k): float(v) for k, v in (b.split(":") for b in args.budgets)}
    limit = args.one_pass_limit_gib * GIB
    results = []
    for size in args.sizes:
        methods = args.methods + (["one_pass_float64"] if size in args.float64_sizes else [])
        for part in args.parts:
            shape = (1, 1, size, size, size) if part == "encode" else (1, ARCH["latent_channels"]) + (size // f,) * 3
            one_pass = estimate_one_pass_bytes(model_geometry(model, "encoder" if part == "encode" else "decoder", shape))
            for method in methods:
                budget = int(budgets[size] * GIB) if method == "bounded" else None
                config = dict(size=size, part=part, method=method, budget=budget)
                if f"{size}:{method}" in args.skip:
                    results.append(dict(config, skipped="skipped (--skip): too slow on this machine"))
                elif method == "one_pass_float64" and part == "decode":
                    # float64 convolutions run as im2col + GEMM: the full-resolution 64-channel
                    # column buffer of the decoder alone is ~29 GiB at 128^3.
                    results.append(dict(config, skipped="skipped: float64 im2col needs ~29 GiB"))
                elif method.startswith("one_pass") and one_pass * (1.3 if method.endswith("contiguous") else 1) > limit:
                    # (the contiguous layout adds oneDNN's reordered copies: leave a margin)
                    results.append(dict(config, estimate_bytes=one_pass, skipped=f"skipped: estimate {one_pass / GIB:.1f} GiB"))
                else:
                    results.append(_run_worker(config, args.timeout, args.resume))
                print(json.dumps(results[-1]), flush=True)
    _differences(results)
    text = table(results)
    print(text)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps({"arch": ARCH, "threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
