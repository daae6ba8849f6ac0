"""Loss terms: beta schedules, the float32 KL with free bits, reconstruction, the total VAE loss."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from medvae.config import ConfigError, LossConfig, load_config
from medvae.losses import VAELoss, kl_loss, kl_weight_at, reconstruction_loss
from medvae.models import VAE3D, VAEOutput

# -- beta schedules -------------------------------------------------------------------------------


def test_constant_schedule_is_flat():
    cfg = LossConfig(kl_schedule="constant", kl_weight=0.25, kl_warmup_steps=100)
    assert [kl_weight_at(s, cfg) for s in (0, 50, 100, 10_000)] == [0.25] * 4


@pytest.mark.parametrize("kind", ["linear", "sigmoid"])
def test_warmup_schedules_at_known_steps(kind):
    cfg = LossConfig(kl_schedule=kind, kl_weight=2.0, kl_warmup_steps=100)
    assert kl_weight_at(0, cfg) == 0.0
    assert kl_weight_at(50, cfg) == pytest.approx(1.0)  # half-way for both ramps
    assert kl_weight_at(100, cfg) == pytest.approx(2.0)
    assert kl_weight_at(5000, cfg) == pytest.approx(2.0)
    ramp = [kl_weight_at(s, cfg) for s in range(101)]
    assert all(b >= a for a, b in zip(ramp, ramp[1:]))  # monotone


def test_linear_is_linear_and_sigmoid_is_s_shaped():
    linear = LossConfig(kl_schedule="linear", kl_weight=1.0, kl_warmup_steps=100)
    sigmoid = LossConfig(kl_schedule="sigmoid", kl_weight=1.0, kl_warmup_steps=100)
    assert kl_weight_at(25, linear) == pytest.approx(0.25)
    assert kl_weight_at(10, sigmoid) < kl_weight_at(10, linear)  # slow start
    assert kl_weight_at(90, sigmoid) > kl_weight_at(90, linear)  # fast finish


def test_cyclical_restarts_every_cycle():
    cfg = LossConfig(kl_schedule="cyclical", kl_weight=1.0, kl_warmup_steps=50, kl_cycle_steps=200)
    assert kl_weight_at(0, cfg) == 0.0
    assert kl_weight_at(25, cfg) == pytest.approx(0.5)
    assert kl_weight_at(50, cfg) == pytest.approx(1.0)
    assert kl_weight_at(199, cfg) == pytest.approx(1.0)
    assert kl_weight_at(200, cfg) == 0.0  # restart
    assert kl_weight_at(225, cfg) == pytest.approx(0.5)
    assert kl_weight_at(650, cfg) == pytest.approx(1.0)


def test_schedule_config_is_validated():
    with pytest.raises(ConfigError, match="kl_cycle_steps"):
        load_config(None, ["loss.kl_schedule=cyclical", "loss.kl_warmup_steps=300", "loss.kl_cycle_steps=200"])
    with pytest.raises(ValueError, match="step"):
        kl_weight_at(-1, LossConfig())


# -- KL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_std", [1.0, 3.0])
def test_kl_loss_matches_torch_distributions(prior_std):
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 2, 3, 4, generator=g) * 2
    logvar = torch.randn(3, 4, 2, 3, 4, generator=g)
    voxels = 5 * 6 * 7
    loss, parts = kl_loss(mean, logvar, voxels_per_volume=voxels, prior_std=prior_std)
    reference = kl_divergence(Normal(mean.double(), (0.5 * logvar.double()).exp()), Normal(0.0, prior_std))
    per_volume = reference.flatten(1).sum(1)  # (B,)
    assert loss.item() == pytest.approx(per_volume.mean().item() / voxels, rel=1e-5)
    assert parts["kl"] == pytest.approx(per_volume.mean().item(), rel=1e-5)
    assert parts["kl_per_element"] == pytest.approx(reference.mean().item(), rel=1e-5)
    expected_channels = reference.transpose(0, 1).flatten(1).mean(1)
    assert torch.allclose(parts["kl_per_channel"].double(), expected_channels, rtol=1e-5)


def test_kl_loss_is_independent_of_volume_size_per_voxel():
    """The same posterior statistics on a grid 8x larger give the same per-voxel KL."""
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(1, 2, 2, 2, 2, generator=g)
    logvar = torch.randn(1, 2, 2, 2, 2, generator=g)
    small, _ = kl_loss(mean, logvar, voxels_per_volume=8 * 8 * 8)
    tiled = lambda t: t.repeat(1, 1, 2, 2, 2)  # noqa: E731
    large, _ = kl_loss(tiled(mean), tiled(logvar), voxels_per_volume=16 * 16 * 16)
    assert large.item() == pytest.approx(small.item(), rel=1e-6)


def test_free_bits_floor_channels_and_stop_their_gradient():
    free_bits = 0.5
    mean = torch.zeros(2, 3, 2, 2, 2)
    mean[:, 0] = 0.1  # KL per element 0.005: below the threshold
    mean[:, 1] = 2.0  # KL per element 2.0: above
    mean[:, 2] = 0.3  # 0.045: below
    mean.requires_grad_(True)
    logvar = torch.zeros(2, 3, 2, 2, 2, requires_grad=True)
    voxels = 4 * 4 * 4
    loss, parts = kl_loss(mean, logvar, voxels_per_volume=voxels, free_bits=free_bits)
    per_channel = parts["kl_per_channel"]
    assert per_channel[0] < free_bits < per_channel[1] and per_channel[2] < free_bits
    latent = 2 * 2 * 2
    expected = (free_bits + per_channel[1].item() + free_bits) * latent / voxels
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(mean.grad[:, [0, 2]] == 0) and torch.all(logvar.grad[:, [0, 2]] == 0)
    assert torch.all(mean.grad[:, 1] != 0)
    # above the threshold the gradient is the normal KL's: d/dmean 0.5 * mean^2, batch and grid mean
    assert torch.allclose(mean.grad[:, 1], mean.detach()[:, 1] / (2 * voxels))
    # parts report the true KL, not the floored one
    assert parts["kl"] == pytest.approx(per_channel.sum().item() * latent, rel=1e-6)


def test_free_bits_zero_is_the_plain_kl():
    g = torch.Generator().manual_seed(3)
    mean, logvar = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    plain, _ = kl_loss(mean, logvar, voxels_per_volume=512)
    tiny, _ = kl_loss(mean, logvar, voxels_per_volume=512, free_bits=1e-12)
    assert plain.item() == pytest.approx(tiny.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_loss_is_float32_under_cpu_autocast(dtype):
    mean = torch.randn(2, 3, 4, 4, 4).to(dtype).requires_grad_(True)
    logvar = torch.randn(2, 3, 4, 4, 4).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(4, 4)).dtype == dtype  # autocast is on
        loss, parts = kl_loss(mean, logvar, voxels_per_volume=4096, free_bits=0.1)
    assert loss.dtype == torch.float32 and parts["kl_per_channel"].dtype == torch.float32
    loss.backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kl_loss_finite_at_extreme_moments(value, dtype):
    mean = torch.full((2, 3, 2, 2, 2), value, dtype=dtype, requires_grad=True)
    logvar = torch.full((2, 3, 2, 2, 2), value, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
        loss, parts = kl_loss(mean, logvar, voxels_per_volume=64, free_bits=0.25)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(parts["kl"])
    assert torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()


def test_kl_loss_rejects_bad_arguments():
    mean = torch.zeros(1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="voxels_per_volume"):
        kl_loss(mean, mean, voxels_per_volume=0)
    with pytest.raises(ValueError, match="free_bits"):
        kl_loss(mean, mean, voxels_per_volume=8, free_bits=-1.0)


# -- reconstruction --------------------------------------------------------------------------------


def test_reconstruction_l1_and_mse():
    g = torch.Generator().manual_seed(4)
    recon, target = torch.randn(2, 1, 8, 8, 8, generator=g), torch.randn(2, 1, 8, 8, 8, generator=g)
    l1, parts = reconstruction_loss(recon, target, kind="l1")
    mse, _ = reconstruction_loss(recon, target, kind="mse")
    assert l1.item() == pytest.approx((recon - target).abs().mean().item(), rel=1e-6)
    assert mse.item() == pytest.approx((recon - target).square().mean().item(), rel=1e-6)
    assert parts == {"l1": pytest.approx(l1.item())}


def test_reconstruction_ssim_term():
    g = torch.Generator().manual_seed(5)
    target = torch.rand(1, 1, 16, 16, 16, generator=g)
    same, parts = reconstruction_loss(target.clone(), target, kind="l1", ssim_weight=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-5) and parts["ssim"] == pytest.approx(1.0, abs=1e-5)
    noisy = target + 0.3 * torch.randn(1, 1, 16, 16, 16, generator=g)
    plain, _ = reconstruction_loss(noisy, target, kind="l1")
    with_ssim, parts = reconstruction_loss(noisy, target, kind="l1", ssim_weight=0.5)
    assert 0 < parts["ssim"] < 1
    assert with_ssim.item() == pytest.approx(plain.item() + 0.5 * (1 - parts["ssim"]), rel=1e-5)


def test_huber_is_mse_inside_delta_and_has_l1_s_bounded_gradient_beyond():
    g = torch.Generator().manual_seed(6)
    target = torch.rand(2, 1, 8, 8, 8, generator=g)
    close = target + 0.3 * (torch.rand(2, 1, 8, 8, 8, generator=g) - 0.5)  # every error inside delta = 1
    huber, parts = reconstruction_loss(close, target, kind="huber")
    mse, _ = reconstruction_loss(close, target, kind="mse")
    assert huber.item() == pytest.approx(mse.item(), rel=1e-6) and parts == {"huber": pytest.approx(huber.item())}
    # raw-HU-sized errors: the loss is linear, and the gradient per voxel is 2 * delta / N, not 2 * error / N
    far = (target + 3000.0).requires_grad_(True)
    loss, _ = reconstruction_loss(far, target, kind="huber", huber_delta=0.5)
    assert loss.item() == pytest.approx(2 * 0.5 * 3000.0 - 0.25, rel=1e-4)
    loss.backward()
    assert far.grad.abs().max().item() == pytest.approx(2 * 0.5 / target.numel(), rel=1e-5)
    with pytest.raises(ValueError, match="huber_delta"):
        reconstruction_loss(close, target, kind="huber", huber_delta=0.0)
    with pytest.raises(ConfigError, match="huber_delta"):
        LossConfig(huber_delta=-1.0)


def test_gradient_term_sees_edges_not_offsets():
    """The edge term is blind to a constant offset, grows when an edge is blurred, and adds with its weight."""
    target = torch.zeros(1, 1, 12, 12, 12)
    target[..., 6:, :, :] = 1.0  # one sharp edge across D
    _, parts = reconstruction_loss(target + 0.25, target, kind="l1", gradient_weight=1.0)
    assert parts["gradient_difference"] == pytest.approx(0.0, abs=1e-7) and parts["l1"] == pytest.approx(0.25)
    blurred = target.clone()
    blurred[..., 5, :, :], blurred[..., 6, :, :] = 1 / 3, 2 / 3  # the step spread over three voxels
    plain, _ = reconstruction_loss(blurred, target, kind="l1")
    with_edges, parts = reconstruction_loss(blurred, target, kind="l1", gradient_weight=0.5)
    # D differences: target 1 at one position, blurred 1/3 at three; |diff| = 1/3 + 2/3 + 1/3 per (h, w),
    # over 11 x 12 x 12 positions; H and W differences are equal (0).
    expected = (4 / 3) / 11 / 3
    assert parts["gradient_difference"] == pytest.approx(expected, rel=1e-5)
    assert with_edges.item() == pytest.approx(plain.item() + 0.5 * expected, rel=1e-5)


def test_vae_loss_passes_the_gradient_weight():
    output, x = _tiny_output()
    without, parts0 = VAELoss(LossConfig())(output, x, step=0)
    with_edges, parts = VAELoss(LossConfig(gradient_weight=2.0))(output, x, step=0)
    assert "gradient_difference" not in parts0 and parts["gradient_difference"] > 0
    assert with_edges.item() == pytest.approx(without.item() + 2.0 * parts["gradient_difference"], rel=1e-5)


def test_negative_reconstruction_weights_are_refused():
    with pytest.raises(ConfigError, match="gradient_weight"):
        LossConfig(gradient_weight=-1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reconstruction_is_float32_under_autocast(dtype):
    target = torch.rand(1, 1, 12, 12, 12)
    recon = (target + 0.1).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = reconstruction_loss(recon, target.to(dtype), kind="mse", ssim_weight=0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(recon.grad.float()).all()


def test_reconstruction_rejects_mismatched_shapes_and_kinds():
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="charbonnier"):
        reconstruction_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), kind="charbonnier")


# -- the whole VAE loss ---------------------------------------------------------------------------


def _tiny_output(dtype=torch.float32):
    model = VAE3D(channels=[8, 16], latent_channels=2, norm_num_groups=4)
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model(x), x


def test_vae_loss_combines_terms_with_the_scheduled_beta():
    cfg = LossConfig(kl_weight=0.5, kl_schedule="linear", kl_warmup_steps=10, free_bits=0.0)
    output, x = _tiny_output()
    loss_fn = VAELoss(cfg)
    total, parts = loss_fn(output, x, step=5)
    rec, _ = reconstruction_loss(output.reconstruction, x, kind=cfg.reconstruction)
    kl, _ = kl_loss(output.mean, output.logvar, voxels_per_volume=x[0].numel())
    assert parts["beta"] == pytest.approx(0.25)
    assert total.item() == pytest.approx(rec.item() + 0.25 * kl.item(), rel=1e-6)
    assert parts["loss"] == pytest.approx(total.item())
    assert parts["kl_weighted"] == pytest.approx(0.25 * parts["kl_loss"])
    assert parts["kl_per_channel"].shape == (2,)
    assert all(isinstance(v, float) for k, v in parts.items() if k != "kl_per_channel")
    total.backward()


def test_vae_loss_is_float32_under_bf16_autocast():
    output, x = _tiny_output(torch.bfloat16)
    assert output.reconstruction.dtype in (torch.bfloat16, torch.float32)
    total, parts = VAELoss(LossConfig())(output, x.bfloat16(), step=0)
    assert total.dtype == torch.float32 and math.isfinite(parts["loss"])


def test_vae_loss_adversarial_term_starts_at_its_step():
    cfg = LossConfig(adversarial_weight=0.1, adversarial_start_step=3, adversarial_loss="lsgan")
    output, x = _tiny_output()
    loss_fn = VAELoss(cfg)
    logits = torch.full((2, 1, 2, 2, 2), 0.5)
    before, parts_before = loss_fn(output, x, step=2, discriminator_logits=logits)
    after, parts_after = loss_fn(output, x, step=3, discriminator_logits=logits)
    assert "g_adv" not in parts_before and not loss_fn.adversarial_active(2)
    assert parts_after["g_adv"] == pytest.approx(0.25)  # lsgan: mean((0.5 - 1)^2)
    assert after.item() == pytest.approx(before.item() + 0.1 * 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="discriminator_logits"):
        loss_fn(output, x, step=3)


def test_vae_loss_refuses_a_perceptual_weight():
    with pytest.raises(ValueError, match="perceptual_weight"):
        VAELoss(LossConfig(perceptual_weight=0.1))


def test_vae_output_fields_feed_the_loss():
    mean = torch.zeros(1, 2, 2, 2, 2)
    output = VAEOutput(torch.zeros(1, 1, 4, 4, 4), mean, mean)
    total, parts = VAELoss(LossConfig(kl_schedule="constant", kl_weight=1.0))(output, torch.zeros(1, 1, 4, 4, 4), 0)
    assert total.item() == 0.0 and parts["kl"] == 0.0
