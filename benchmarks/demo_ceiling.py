"""What the demo's held-out PSNR can reach: reference reconstructions of the held-out T1 and a run's.

The held-out scan (nibabel's ``anatomical.nii``, the demo's validation volume) goes through the demo
run's own preprocessing (the export's pipeline: 2 mm, ``mri_percentile``, padding to the factor), and
each reference reconstruction is scored as validation scores it (PSNR, data range 1, both clamped to
[0, 1]). The noise std is Immerkaer's estimate from the 3-D Laplacian residual; a perfect denoiser's
error is that noise, so its PSNR is -20 log10(noise std).

    python benchmarks/demo_ceiling.py --run runs/demo [--json out.json]

Needs a finished demo run (its export fixes the preprocessing); prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def psnr(reconstruction: torch.Tensor, image: torch.Tensor) -> float:
    mse = ((reconstruction.clamp(0, 1) - image.clamp(0, 1)) ** 2).mean()
    return float(-10 * torch.log10(mse))


def laplacian_noise_std(volume: torch.Tensor) -> float:
    """Noise std of a (D, H, W) volume from its 6-neighbour Laplacian (white noise: residual std = sqrt(42) sigma)."""
    v = volume
    residual = (6 * v[1:-1, 1:-1, 1:-1] - v[:-2, 1:-1, 1:-1] - v[2:, 1:-1, 1:-1] - v[1:-1, :-2, 1:-1]
                - v[1:-1, 2:, 1:-1] - v[1:-1, 1:-1, :-2] - v[1:-1, 1:-1, 2:])
    return float(residual.std() / math.sqrt(42.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `medvae train configs/demo.yaml` run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from monai.transforms import GaussianSmooth

    from medvae.data.demo import demo_datalist
    from medvae.jobs.loading import load_for_inference
    from medvae.models.shortcut import add_decoded_latent, encoded_input

    loaded = load_for_inference(args.run, device="cpu")
    datalist = demo_datalist()
    held_out = json.loads(datalist.read_text())["validation"][0]
    held_out = {**held_out, "image": str(datalist.parent / held_out["image"])}
    image = loaded.prepare(held_out).as_subclass(torch.Tensor)[None].float()  # (1, 1, D, H, W)
    noise = laplacian_noise_std(image[0, 0])
    rows = [("its mean value everywhere", psnr(torch.full_like(image, float(image.mean())), image)),
            ("x2 block average, trilinear back up",
             psnr(F.interpolate(F.avg_pool3d(image, 2), size=image.shape[2:], mode="trilinear", align_corners=False), image))]
    # The model's fixed block codes alone (medvae.models.shortcut), at the run's factor and latent width:
    # what a model whose learned parts were all zero would reconstruct.
    f, latent = loaded.model.downsampling_factor, loaded.model.arch.latent_channels
    for kind in ("mean", "dct"):
        code = encoded_input(image, kind, f, latent)
        rows.append((f"the shortcut's '{kind}' code alone (x{f}, {latent} channels)",
                     psnr(add_decoded_latent(torch.zeros_like(image), code, kind, f), image)))
    for sigma in (1.0, 0.75, 0.5):
        rows.append((f"Gaussian blur, sigma {sigma} voxel", psnr(GaussianSmooth(sigma=sigma)(image[0])[None], image)))
    rows.append((f"a perfect denoiser (noise std {noise:.3f})", -20 * math.log10(noise)))
    with torch.no_grad():
        rows.append((f"the run's model ({args.run})", psnr(loaded.reconstruct(image[0])[None], image)))

    print(f"held-out {held_out['id']}: {tuple(image.shape[2:])} voxels after the run's preprocessing")
    print("| reconstruction of the held-out T1 | PSNR (dB) |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"held_out": held_out["id"], "shape": list(image.shape[2:]), "noise_std": noise,
                                         "rows": [{"row": label, "psnr_db": value} for label, value in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
