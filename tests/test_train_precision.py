"""Mixed precision with two optimizers: per-optimizer unscaling and clipping under fp16."""

import pytest
import torch
from accelerate import Accelerator

from medvae import VAE3D
from medvae.losses.adversarial import discriminator_loss, generator_adversarial_loss
from medvae.models.discriminator import PatchDiscriminator3D
from medvae.train.precision import Precision, accelerate_mixed_precision
from phantoms import write_phantoms
from training_helpers import TINY_TRAINING, read_jsonl, run_medvae_train


def test_cpu_fp16_is_real_autocast_with_a_scaler():
    accelerator = Accelerator(cpu=True, mixed_precision=accelerate_mixed_precision("fp16", cpu=True))
    precision = Precision(accelerator, "fp16")
    assert precision.scaler is not None
    with precision.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.float16


def _total_norm(parameters) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))


def test_clipped_norms_stay_below_max_for_generator_and_discriminator_under_fp16():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    precision = Precision(accelerator, "fp16")
    vae = VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=2)
    disc = PatchDiscriminator3D(channels=8, num_layers=2, norm_num_groups=4)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    max_norm = 1e-4  # below the raw norms, so clipping acts on both models
    x = torch.rand(2, 1, 16, 16, 16)
    applied = {"generator": 0, "discriminator": 0}
    for _ in range(12):
        with precision.autocast():
            out = vae(x)
            g_loss = (out.reconstruction.float() - x).abs().mean() + generator_adversarial_loss(
                disc(out.reconstruction).float(), "hinge")
        precision.backward(g_loss)
        precision.unscale_(opt_g)  # only the generator's optimizer
        raw = torch.nn.utils.clip_grad_norm_(vae.parameters(), max_norm)
        if torch.isfinite(raw):  # else fp16 overflowed: the scaler must skip this step
            assert raw > max_norm and _total_norm(vae.parameters()) <= max_norm * (1 + 1e-3)
        assert precision.step(opt_g) == bool(torch.isfinite(raw))
        applied["generator"] += bool(torch.isfinite(raw))
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)  # the generator loss also reached the discriminator

        with precision.autocast():
            d_loss = discriminator_loss(disc(x).float(), disc(out.reconstruction.detach()).float(), "hinge")
        precision.backward(d_loss)
        precision.unscale_(opt_d)  # would raise if the generator's unscale_ had touched this optimizer
        raw_d = torch.nn.utils.clip_grad_norm_(disc.parameters(), max_norm)
        if torch.isfinite(raw_d):
            assert raw_d > max_norm and _total_norm(disc.parameters()) <= max_norm * (1 + 1e-3)
        assert precision.step(opt_d) == bool(torch.isfinite(raw_d))
        applied["discriminator"] += bool(torch.isfinite(raw_d))
        opt_d.zero_grad(set_to_none=True)
    assert applied["generator"] > 0 and applied["discriminator"] > 0, applied
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_adversarial_fp16_run_with_ema_end_to_end(tmp_path):
    write_phantoms(tmp_path / "data", count=4, shape=(24, 24, 24))
    run = tmp_path / "run"
    result = run_medvae_train(tmp_path, TINY_TRAINING + [
        f"data.train={tmp_path / 'data'}", f"train.output_dir={run}", "train.max_steps=4", "data.patch_size=[24,24,24]",
        "train.mixed_precision=fp16", "train.ema_decay=0.9", "train.val_every=0", "train.checkpoint_every=100",
        "loss.adversarial_weight=0.1", "loss.adversarial_start_step=2", "loss.discriminator_channels=8",
        "loss.discriminator_layers=2",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "train/g_adv" in rows[-1] and "train/g_adv" not in rows[0]
    assert all("train/loss_scale" in r for r in rows)
    assert (run / "checkpoints" / "step_000004" / "ema.safetensors").is_file()
