"""What the convergence benchmark's held-out PSNR can reach: reference codes at the same compression.

``convergence.py`` scores every system on crops of three real individual heads that are not in
training. This script scores fixed, training-free or linear reconstructions of exactly those crops
(the same ``build_data`` call, so the same crops) with ``convergence.py``'s own ``score`` (PSNR and
SSIM, data range 1, averaged over crops). It tells how far a recipe can still move the number,
and how much of the gap to the target is the scans' noise:

- each crop's mean value everywhere;
- x4 block average, trilinear back up (1 number per 4^3 block: a third of the latent's 3);
- the model's parameter-free shortcut codes alone (``model.shortcut`` "mean" and "dct", 3 channels);
- block PCA: non-overlapping 4^3 blocks coded by their first k principal components, fitted on the
  training crops (k = 3 is the comparison architecture's 21x compression, a linear code with the
  latent's numbers per voxel); the same fitted on the held-out crops themselves (an oracle);
- a perfect denoiser: the error is the noise (Immerkaer's Laplacian estimate per crop).

    python benchmarks/heldout_ceiling.py --spacing 2 --crop 24 --train-crops 64 --heldout-per-head 8 [--json out.json]

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import build_data, score  # noqa: E402
from demo_ceiling import laplacian_noise_std  # noqa: E402

from medvae.models.shortcut import add_decoded_latent, encoded_input  # noqa: E402


def blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """(1, 1, D, H, W) with sides divisible by b -> (number of blocks, b^3) rows."""
    d, h, w = x.shape[2:]
    return x.reshape(d // b, b, h // b, b, w // b, b).permute(0, 2, 4, 1, 3, 5).reshape(-1, b**3)


def unblocks(rows: torch.Tensor, shape: tuple[int, int, int], b: int) -> torch.Tensor:
    d, h, w = shape
    return rows.reshape(d // b, h // b, w // b, b, b, b).permute(0, 3, 1, 4, 2, 5).reshape(1, 1, d, h, w)


class BlockPCA:
    """Mean and the first k principal axes of b^3 blocks (float64 SVD)."""

    def __init__(self, crops: list[torch.Tensor], b: int):
        rows = torch.cat([blocks(x, b) for x in crops]).double()
        self.b, self.mean = b, rows.mean(0)
        self.axes = torch.linalg.svd(rows - self.mean, full_matrices=False).Vh  # (b^3, b^3), rows are axes

    def reconstruct(self, x: torch.Tensor, k: int) -> torch.Tensor:
        rows = blocks(x, self.b).double() - self.mean
        axes = self.axes[:k]
        return unblocks((rows @ axes.T) @ axes + self.mean, tuple(x.shape[2:]), self.b).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--crop", type=int, default=24)
    parser.add_argument("--train-crops", type=int, default=64)
    parser.add_argument("--heldout-per-head", type=int, default=8)
    parser.add_argument("--factor", type=int, default=4, help="the model's downsampling per axis (block side)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "medvae-benchmarks")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.crop % args.factor:
        parser.error(f"--crop {args.crop} is not a multiple of --factor {args.factor}")

    train_np, heldout_np, heads = build_data(args.spacing, args.crop, args.train_crops, args.heldout_per_head,
                                             args.cache)
    train = [torch.from_numpy(c)[None, None] for c in train_np]
    heldout = [torch.from_numpy(c)[None, None] for c in heldout_np]
    b = args.factor
    latent_numbers = 3  # the comparison architecture's latent channels per b^3 block
    pca_train, pca_oracle = BlockPCA(train, b), BlockPCA(heldout, b)

    references = {
        "each crop's mean value everywhere": lambda x: torch.full_like(x, float(x.mean())),
        f"x{b} block average, trilinear back up (1 number per {b}^3 block)":
            lambda x: F.interpolate(F.avg_pool3d(x, b), size=x.shape[2:], mode="trilinear", align_corners=False),
    }
    # The model's fixed shortcut codes alone (medvae.models.shortcut, the latent's 3 channels): what the
    # model reconstructs with every learned part at zero.
    for kind in ("mean", "dct"):
        references[f"the shortcut's '{kind}' code alone ({latent_numbers} per {b}^3 block)"] = (
            lambda x, kind=kind: add_decoded_latent(torch.zeros_like(x), encoded_input(x, kind, b, latent_numbers), kind, b))
    for k in (1, latent_numbers, 6, 12):
        label = f"block PCA, {k} per {b}^3 block, fitted on the training crops"
        if k == latent_numbers:
            label += f" ({b**3 / k:.0f}x: the latent's compression)"
        references[label] = lambda x, k=k: pca_train.reconstruct(x, k)
    references[f"block PCA, {latent_numbers} per {b}^3 block, fitted on the held-out crops (oracle)"] = (
        lambda x: pca_oracle.reconstruct(x, latent_numbers))
    rows = [(label, *score(reconstruct, heldout)) for label, reconstruct in references.items()]
    noise = [laplacian_noise_std(x[0, 0]) for x in heldout]
    rows.append((f"a perfect denoiser (noise std median {float(np.median(noise)):.3f})",
                 float(np.mean([-20 * math.log10(s) for s in noise])), float("nan")))

    print(f"{len(heldout)} held-out crops of {args.crop}^3 at {args.spacing:g} mm from {', '.join(heads)}")
    print("| reconstruction of the held-out crops | PSNR (dB) | SSIM |\n|---|---|---|")
    for label, psnr, ssim in rows:
        print(f"| {label} | {psnr:.2f} | {ssim:.3f} |")
    if args.json:
        from medvae.atomic import atomic_file

        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"spacing_mm": args.spacing, "crop": args.crop, "train_crops": args.train_crops,
                       "heldout_heads": heads, "heldout_crops": len(heldout), "noise_std": noise,
                       "rows": [{"row": label, "psnr_db": psnr, "ssim": None if math.isnan(ssim) else ssim}
                                            for label, psnr, ssim in rows]}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
