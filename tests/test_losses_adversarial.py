"""The 3D patch discriminator and the hinge / LSGAN terms."""

import pytest
import torch

from medvae.losses import discriminator_loss, generator_adversarial_loss
from medvae.models.discriminator import PatchDiscriminator3D


@pytest.mark.parametrize("num_layers,side", [(1, 6), (2, 16), (2, 20), (3, 24)])
@pytest.mark.parametrize("norm,spectral", [("group", False), ("none", True)])
def test_patch_logit_shape(num_layers, side, norm, spectral):
    disc = PatchDiscriminator3D(in_channels=1, channels=8, num_layers=num_layers, norm=norm, norm_num_groups=4, spectral_norm=spectral)
    logits = disc(torch.randn(2, 1, side, side, side))
    expected = side // 2**num_layers - 2
    assert logits.shape == (2, 1, expected, expected, expected)


def test_too_small_input_is_a_clear_error():
    disc = PatchDiscriminator3D(channels=8, num_layers=3, norm_num_groups=4)
    with pytest.raises(ValueError, match="smaller than 24"):
        disc(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator3D(norm="batch")


def test_spectral_norm_bounds_the_weight_spectrum():
    torch.manual_seed(0)
    disc = PatchDiscriminator3D(channels=8, num_layers=2, norm="none", spectral_norm=True)
    disc.train()
    for _ in range(20):  # power iterations converge during training-mode forwards
        disc(torch.randn(1, 1, 16, 16, 16))
    conv = disc.layers[0]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, rel=0.05)


def test_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    disc = PatchDiscriminator3D(channels=8, num_layers=2, norm_num_groups=4)
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real, fake = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16) * 0.2
    first = None
    for _ in range(15):
        loss = discriminator_loss(disc(real), disc(fake), "hinge")
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first


@pytest.mark.parametrize("kind", ["hinge", "lsgan"])
def test_adversarial_terms_match_their_definitions(kind):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 1, 3, 3, 3, generator=g), torch.randn(2, 1, 3, 3, 3, generator=g)
    d_loss = discriminator_loss(real, fake, kind)
    g_loss = generator_adversarial_loss(fake, kind)
    if kind == "hinge":
        assert d_loss.item() == pytest.approx(0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean()).item())
        assert g_loss.item() == pytest.approx(-fake.mean().item())
    else:
        assert d_loss.item() == pytest.approx(0.5 * ((real - 1).square().mean() + fake.square().mean()).item())
        assert g_loss.item() == pytest.approx((fake - 1).square().mean().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adversarial_terms_are_float32_under_autocast(dtype):
    disc = PatchDiscriminator3D(channels=8, num_layers=1, norm_num_groups=4)
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        logits = disc(x)
        assert logits.dtype == dtype  # the convolutions really ran in low precision
        assert discriminator_loss(logits, logits, "hinge").dtype == torch.float32
        assert generator_adversarial_loss(logits, "lsgan").dtype == torch.float32


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="wgan"):
        generator_adversarial_loss(torch.zeros(1), "wgan")
