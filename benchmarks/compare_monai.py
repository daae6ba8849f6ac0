"""medvae.VAE3D against MONAI's AutoencoderKL at the same architecture, on CPU.

Both models: 3D, 1 -> 1 channel, channels (32, 64, 64), one residual block per level, latent 3,
no attention, 32 norm groups. For each task (train step, encode, decode), volume edge and precision
(fp32, bf16 autocast), every measurement runs in a fresh process (so its peak resident memory is its
own), and the two models alternate A B A B to cancel machine drift. Reported: median seconds per
call, voxels per second, peak RSS, and the medvae / MONAI ratios. Also: parameter counts and the
initial KL per latent element on [0, 1] and raw Hounsfield-unit input.

    python benchmarks/compare_monai.py                            # full run (about an hour on 2 cores)
    python benchmarks/compare_monai.py --sizes 32 --codec-sizes 32 --rounds 1 --repeats 2   # quick

Writes JSON (default benchmarks/out/compare_monai.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODELS = ("medvae", "monai")
ARCHITECTURE = dict(channels=(32, 64, 64), num_res_blocks=1, latent_channels=3, norm_num_groups=32)
FACTOR = 4  # downsampling per axis of this architecture


# ----------------------------------------------------------------------------- models and inputs


def build_model(name: str, seed: int = 0, **medvae_options: Any):
    """The comparison architecture as medvae.VAE3D or monai AutoencoderKL, initialised from ``seed``."""
    import torch

    torch.manual_seed(seed)
    if name == "medvae":
        from medvae import VAE3D

        return VAE3D(in_channels=1, **ARCHITECTURE, **medvae_options)
    if name == "monai":
        from monai.networks.nets import AutoencoderKL

        return AutoencoderKL(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=ARCHITECTURE["channels"],
            num_res_blocks=ARCHITECTURE["num_res_blocks"],
            latent_channels=ARCHITECTURE["latent_channels"],
            norm_num_groups=ARCHITECTURE["norm_num_groups"],
            attention_levels=(False, False, False),
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def phantom(size: int, seed: int = 0):
    """(1, 1, size, size, size) ellipsoid with a brighter core and noise, in [0, 1]."""
    import torch

    axis = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    r2 = (z / 0.8) ** 2 + (y / 0.6) ** 2 + (x / 0.7) ** 2
    vol = (r2 < 1).float() * 0.6 + (r2 < 0.3).float() * 0.3
    vol = vol + 0.05 * torch.rand(vol.shape, generator=torch.Generator().manual_seed(seed))
    return vol.clamp(0, 1)[None, None]


def posterior(model, name: str, x):
    """The model's posterior over the latent as a medvae DiagonalGaussian (float32 KL for both)."""
    import torch

    from medvae.models import DiagonalGaussian

    if name == "medvae":
        return model.encode(x)
    mu, sigma = model.encode(x)
    return DiagonalGaussian(mu, 2.0 * torch.log(sigma.float()))


def forward_train(model, name: str, x):
    """(reconstruction, posterior) with the posterior sampled, as in training."""
    from medvae.models import DiagonalGaussian

    if name == "medvae":
        out = model(x)
        return out.reconstruction, DiagonalGaussian(out.mean, out.logvar)
    reconstruction, mu, sigma = model(x)
    import torch

    return reconstruction, DiagonalGaussian(mu, 2.0 * torch.log(sigma.float()))


# ----------------------------------------------------------------------------- one measurement


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(model_name: str, task: str, size: int, mode: str, repeats: int, warmup: int, **options: Any) -> dict:
    """Time ``repeats`` calls of one task in this process; return times and memory."""
    import torch

    import monai.networks.nets  # noqa: F401  (both workers import the same libraries: same baseline RSS)
    import medvae.models  # noqa: F401

    model = build_model(model_name, **options)
    x = phantom(size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")
    if task == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def call():
            with autocast:
                reconstruction, post = forward_train(model, model_name, x)
            loss = (reconstruction.float() - x).abs().mean() + 1e-6 * post.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

    elif task == "encode":
        model.eval()

        def call():
            with torch.no_grad(), autocast:
                return posterior(model, model_name, x).mean

    elif task == "decode":
        model.eval()
        z = torch.randn(1, ARCHITECTURE["latent_channels"], size // FACTOR, size // FACTOR, size // FACTOR, generator=torch.Generator().manual_seed(1))

        def call():
            with torch.no_grad(), autocast:
                return model.decode(z)

    else:
        raise ValueError(f"unknown task {task!r}")

    baseline_mb = rss_now_mb()
    finite = True
    for _ in range(warmup):
        finite &= bool(torch.isfinite(call()).all())
    times, cpu = [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        finite &= bool(torch.isfinite(out).all())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(times=times, cpu=cpu, peak_mb=peak_mb, baseline_mb=baseline_mb, finite=finite, threads=torch.get_num_threads())


def spawn_worker(model_name: str, task: str, size: int, mode: str, repeats: int, warmup: int, threads: int = 0) -> dict:
    """Run one measurement in a fresh Python process and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model_name, task, str(size), mode,
           "--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {model_name} {task} {size} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- facts at init


def init_facts() -> dict:
    """Parameter counts and the mean KL per latent element at init (3 seeds, 32^3 phantom)."""
    import torch

    facts: dict[str, Any] = {}
    x01 = phantom(32)
    inputs = {"unit_range": x01, "zscore": (x01 - x01.mean()) / x01.std(), "hounsfield": x01 * 3000 - 1024}
    for name in MODELS:
        models = [build_model(name, seed).eval() for seed in range(3)]
        facts[name] = {"parameters": sum(p.numel() for p in models[0].parameters())}
        for label, x in inputs.items():
            with torch.no_grad():
                values = [posterior(model, name, x).kl_per_element().mean().item() for model in models]
            facts[name][f"init_kl_per_element_{label}"] = statistics.mean(values)
            facts[name][f"init_kl_total_{label}"] = statistics.mean(values) * 3 * (32 // FACTOR) ** 3
    return facts


# ----------------------------------------------------------------------------- the comparison


def configurations(args) -> list[tuple[str, int, str]]:
    configs = []
    for mode in args.modes:
        if "train" in args.tasks:
            configs += [("train", s, mode) for s in args.sizes]
        for task in ("encode", "decode"):
            if task in args.tasks:
                configs += [(task, s, mode) for s in args.codec_sizes]
    return configs


def summarise(task: str, size: int, mode: str, runs: dict[str, list[dict]]) -> dict:
    row: dict[str, Any] = {"task": task, "size": size, "mode": mode}
    for name in MODELS:
        times = [t for r in runs[name] for t in r["times"]]
        cpu = [t for r in runs[name] for t in r["cpu"]]
        median = statistics.median(times)
        row[name] = {
            "median_s": median,
            "min_s": min(times),
            "cpu_s": statistics.median(cpu),
            "voxels_per_s": size**3 / median,
            "peak_mb": max(r["peak_mb"] for r in runs[name]),
            "baseline_mb": min(r["baseline_mb"] for r in runs[name]),
            "finite": all(r["finite"] for r in runs[name]),
            "times": times,
        }
    a, b = row["medvae"], row["monai"]
    row["time_ratio"] = a["median_s"] / b["median_s"]
    row["speedup"] = b["median_s"] / a["median_s"]
    row["peak_ratio"] = a["peak_mb"] / b["peak_mb"]
    row["working_set_ratio"] = (a["peak_mb"] - a["baseline_mb"]) / max(b["peak_mb"] - b["baseline_mb"], 1e-9)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| task | size | mode | medvae s | MONAI s | speedup | medvae CPU s | MONAI CPU s | medvae kvox/s | MONAI kvox/s "
        "| medvae peak MB | MONAI peak MB | peak ratio | working-set ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["medvae"], r["monai"]
        lines.append(
            f"| {r['task']} | {r['size']}³ | {r['mode']} | {a['median_s']:.3f} | {b['median_s']:.3f} | {r['speedup']:.2f}x "
            f"| {a['cpu_s']:.3f} | {b['cpu_s']:.3f} | {a['voxels_per_s'] / 1e3:.0f} | {b['voxels_per_s'] / 1e3:.0f} "
            f"| {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | {r['peak_ratio']:.2f} | {r['working_set_ratio']:.2f} |"
        )
    return "\n".join(lines)


def render(path: Path) -> None:
    """Print the Markdown table of a saved JSON result."""
    print(markdown_table(json.loads(Path(path).read_text())["rows"]))


def write_json(path: Path, payload: dict) -> None:
    from medvae.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "TASK", "SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96], help="volume edges for the training step")
    parser.add_argument("--codec-sizes", type=int, nargs="+", default=[32, 64, 96, 128], help="volume edges for encode/decode")
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--tasks", nargs="+", default=["train", "encode", "decode"], choices=["train", "encode", "decode"])
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs of fresh processes per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per process")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "compare_monai.json")
    parser.add_argument("--skip-init-facts", action="store_true", help="skip parameter counts and initial KL")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only print the table of a saved result")
    args = parser.parse_args(argv)

    if args.render:
        render(args.render)
        return

    if args.worker:
        name, task, size, mode = args.worker
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(run_worker(name, task, int(size), mode, args.repeats, args.warmup)))
        return

    if any(s % FACTOR for s in args.sizes + args.codec_sizes):
        parser.error(f"every size must be divisible by {FACTOR}")
    payload: dict[str, Any] = {
        "command": "python benchmarks/compare_monai.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "architecture": ARCHITECTURE,
        "cpu_count": os.cpu_count(),
        "threads": args.threads or "default",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [],
    }
    if not args.skip_init_facts:
        payload["init"] = init_facts()
        for name in MODELS:
            f = payload["init"][name]
            print(f"{name}: {f['parameters']:,} parameters; initial KL per latent element "
                  f"{f['init_kl_per_element_unit_range']:.4f} on [0,1], {f['init_kl_per_element_zscore']:.4f} z-scored, "
                  f"{f['init_kl_per_element_hounsfield']:.4g} on HU", flush=True)
    for task, size, mode in configurations(args):
        runs: dict[str, list[dict]] = {name: [] for name in MODELS}
        for _ in range(args.rounds):
            for name in MODELS:  # A B A B
                runs[name].append(spawn_worker(name, task, size, mode, args.repeats, args.warmup, args.threads))
        row = summarise(task, size, mode, runs)
        payload["rows"].append(row)
        print(f"{task:6s} {size:4d}³ {mode}: medvae {row['medvae']['median_s']:.3f} s, MONAI {row['monai']['median_s']:.3f} s "
              f"({row['speedup']:.2f}x); peak {row['medvae']['peak_mb']:.0f} vs {row['monai']['peak_mb']:.0f} MB "
              f"({row['peak_ratio']:.2f})", flush=True)
        write_json(args.out, payload)  # partial results survive an interrupted run
    payload["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(args.out, payload)
    print()
    print(markdown_table(payload["rows"]))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
