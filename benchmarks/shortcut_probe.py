"""The probe that led to ``model.shortcut``: parameter-free shortcuts wrapped around the VAE.

medvae now has the shortcut built in (``medvae.models.shortcut``, on by default; RESULTS.md, "The
latent shortcut"). This script is kept as the record of the probe and for MONAI's AutoencoderKL with
the same shortcuts (``--monai-lr``). Its medvae runs set ``model.shortcut=false`` so that the wrapper
below is the only shortcut. The ceiling table in RESULTS.md ("Where the held-out number can go") shows a x4
block average beating both VAEs after 300 steps. This probe asks whether a model that starts from
that code learns faster. It wraps ``VAE3D.encode``/``decode`` inside this process only (after
DC-AE's residual autoencoding, simplified):

- encode: the posterior mean gets ``avg_pool3d(x, f)`` (channel-averaged) added to every latent channel;
- decode: the output gets the latent's channel mean, nearest-upsampled x f, added;
- ``--logvar-bias B``: the moments convolution's logvar bias starts at B instead of 0, so the decoder
  does not first see N(0, 1) noise on top of the shortcut.

The wrapper is seen only by the training loop and validation (``encode``/``decode``); the built
shortcut is also applied by the memory-bounded runner (medvae.inference), with parity tests.

    python benchmarks/shortcut_probe.py --seeds 0 1 2 [--no-shortcut] [--logvar-bias -4] --json out.json
    python benchmarks/shortcut_probe.py --seeds 0 --monai-lr 1e-4 --json out.json   # MONAI with the same shortcuts

Same data, crops and scoring as ``convergence.py --spacing 2 --crop 24 --train-crops 64
--heldout-per-head 8`` with medvae's default (4 x 16^3 per step); prints each curve and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import build_data, medvae_run, monai_run  # noqa: E402
from real_volumes import write_nifti_folder  # noqa: E402


def install(shortcut: bool, logvar_bias: float) -> None:
    """Wrap VAE3D in this process: the shortcuts and/or the logvar bias at construction."""
    import medvae.models.vae as vae
    from medvae.models.posterior import DiagonalGaussian

    encoder_init, encode, decode = vae.Encoder.__init__, vae.VAE3D.encode, vae.VAE3D.decode

    def init_with_bias(self, arch):
        encoder_init(self, arch)
        with torch.no_grad():
            self.conv_out.bias[arch.latent_channels:].fill_(logvar_bias)

    def encode_with_shortcut(self, x):
        posterior = encode(self, x)
        pooled = F.avg_pool3d(x.float(), self.downsampling_factor).mean(1, keepdim=True)
        return DiagonalGaussian(posterior.mean + pooled.expand_as(posterior.mean), posterior.logvar)

    def decode_with_shortcut(self, z):
        out = decode(self, z)
        up = F.interpolate(z.float().mean(1, keepdim=True), scale_factor=self.downsampling_factor, mode="nearest")
        return out + up.to(out.dtype)

    vae.Encoder.__init__ = init_with_bias
    if shortcut:
        vae.VAE3D.encode, vae.VAE3D.decode = encode_with_shortcut, decode_with_shortcut


def install_monai() -> None:
    """The same two shortcuts around MONAI's AutoencoderKL (x4: the comparison architecture), in this process."""
    from monai.networks.nets import AutoencoderKL

    encode, decode = AutoencoderKL.encode, AutoencoderKL.decode

    def encode_with_shortcut(self, x):
        z_mu, z_sigma = encode(self, x)
        return z_mu + F.avg_pool3d(x.float(), 4).mean(1, keepdim=True).expand_as(z_mu), z_sigma

    def decode_with_shortcut(self, z):
        return decode(self, z) + F.interpolate(z.mean(1, keepdim=True), scale_factor=4, mode="nearest")

    AutoencoderKL.encode, AutoencoderKL.decode = encode_with_shortcut, decode_with_shortcut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--no-shortcut", action="store_true", help="only the logvar bias")
    parser.add_argument("--logvar-bias", type=float, default=-4.0)
    parser.add_argument("--monai-lr", type=float, default=None,
                        help="train MONAI's AutoencoderKL (tutorial recipe, this lr) with the same shortcuts instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "medvae-benchmarks")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.monai_lr is None:
        install(not args.no_shortcut, args.logvar_bias)
    elif not args.no_shortcut:
        install_monai()

    train, heldout, heads = build_data(2.0, 24, 64, 8, args.cache)
    work = Path(tempfile.mkdtemp(prefix="medvae-shortcut-probe-"))
    train_dir = write_nifti_folder(train, work / "train")
    heldout_dir = write_nifti_folder(heldout, work / "heldout", prefix="heldout")
    runs = []
    for seed in args.seeds:
        if args.monai_lr is not None:
            result = monai_run([torch.from_numpy(c)[None, None] for c in train],
                               [torch.from_numpy(c)[None, None] for c in heldout], lr=args.monai_lr,
                               steps=args.steps, eval_every=args.eval_every, seed=seed)
        else:
            result = medvae_run(train_dir, heldout_dir, work / f"seed{seed}",
                                overrides=["data.batch_size=4", "data.patch_size=[16,16,16]", "model.shortcut=false"], crop=24,
                                steps=args.steps, eval_every=args.eval_every, seed=seed)
        runs.append({"seed": seed, **result})
        print(seed, " ".join(f"{c['step']}:{c['psnr']:.2f}" for c in result["curve"]),
              f"guard actions {result['guard_actions']}", flush=True)

    from medvae.atomic import atomic_file

    with atomic_file(args.json) as tmp:
        tmp.write_text(json.dumps({"system": "monai" if args.monai_lr is not None else "medvae", "shortcut": not args.no_shortcut, "logvar_bias": args.logvar_bias,
                                   "steps": args.steps, "heldout_heads": heads, "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
