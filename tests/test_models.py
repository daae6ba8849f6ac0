import math

import pytest
import torch
from reference_model import block_code

from medvae import VAE3D, VAEOutput
from medvae.models import DiagonalGaussian
from medvae.models.shortcut import POOLED_LIMIT

TINY = dict(channels=[8, 16], norm_num_groups=4, latent_channels=2)


@pytest.mark.parametrize(
    "channels, factor",
    [([8, 16], 2), ([8, 16, 16], 4), ([8, 8, 16, 16], 8)],
)
@pytest.mark.parametrize("attention", [False, True])
def test_shapes_for_each_downsampling_factor(channels, factor, attention):
    model = VAE3D(channels=channels, norm_num_groups=4, latent_channels=3, attention=attention, attention_heads=2)
    assert model.downsampling_factor == factor
    x = torch.rand(2, 1, 16, 24, 32)
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.reconstruction.shape == x.shape
    assert out.mean.shape == (2, 3, 16 // factor, 24 // factor, 32 // factor)
    assert out.logvar.shape == out.mean.shape
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussian)
    assert model.decode(posterior.mode()).shape == x.shape


def test_indivisible_size_raises_clear_error():
    model = VAE3D(**TINY, channels_last=False) if False else VAE3D(channels=[8, 16, 16], norm_num_groups=4)
    with pytest.raises(ValueError, match=r"not divisible by the downsampling factor 4"):
        model.encode(torch.rand(1, 1, 16, 18, 16))


def test_wrong_rank_and_channels_raise():
    model = VAE3D(**TINY)
    with pytest.raises(ValueError, match="5-D"):
        model.encode(torch.rand(1, 16, 16, 16))
    with pytest.raises(ValueError, match="input channel"):
        model.encode(torch.rand(1, 2, 16, 16, 16))


@pytest.mark.parametrize("bad", [dict(channels=[8]), dict(channels=[8, 12], norm_num_groups=8), dict(dropout=1.0)])
def test_bad_architecture_raises(bad):
    with pytest.raises(ValueError):
        VAE3D(**{**TINY, **bad})


def _phantom(shape=(32, 32, 32)):
    """Ellipsoid with a brighter core and some noise, in [0, 1]."""
    d, h, w = shape
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, d), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    r2 = (z / 0.8) ** 2 + (y / 0.6) ** 2 + (x / 0.7) ** 2
    vol = (r2 < 1).float() * 0.6 + (r2 < 0.3).float() * 0.3
    vol = vol + 0.05 * torch.rand(shape, generator=torch.Generator().manual_seed(0))
    return vol.clamp(0, 1)[None, None]


@pytest.mark.parametrize("normalisation", ["unit_range", "zscore"])
def test_initial_kl_per_element_is_near_the_prior(normalisation):
    """The learned part of the posterior starts at the prior; the shortcut (on by default) adds the
    input's block code to the mean, so the KL is that code's KL and nothing more."""
    torch.manual_seed(0)
    model = VAE3D()  # the comparison architecture: channels (32, 64, 64), latent 3
    x = _phantom()
    if normalisation == "zscore":
        x = (x - x.mean()) / x.std()
    with torch.no_grad():
        kl = model.encode(x).kl_per_element().mean().item()
        model.arch.shortcut = "none"
        learned = model.encode(x).kl_per_element().mean().item()
    block_code_kl = 0.5 * block_code(x, "dct", 4, 3).square().mean().item()
    assert learned < 0.01
    assert abs(kl - block_code_kl) < 0.01


def test_initial_kl_stays_bounded_on_unnormalised_hounsfield_units():
    """Raw HU: the learned part starts at the prior, and the shortcut's term saturates (at most
    POOLED_LIMIT^2 / 2 per element and coefficient), so a 10x larger scale barely makes the KL larger."""
    torch.manual_seed(0)
    model = VAE3D()
    kls = []
    for scale in (3000, 30000):
        x = _phantom() * scale - 1024  # raw CT range, and ten times wider
        with torch.no_grad():
            kls.append(model.encode(x).kl_per_element().mean().item())
            model.arch.shortcut = "none"
            assert model.encode(x).kl_per_element().mean().item() < 0.1
            model.arch.shortcut = "dct"
    assert max(kls) <= 0.5 * POOLED_LIMIT**2 + 0.1
    assert kls[1] < 1.5 * kls[0]  # unclamped, ten times the scale would be a hundred times the KL


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (3000.0, -1024.0)])
def test_logvar_init_sets_the_initial_posterior_std_whatever_the_input_scale(scale, offset):
    """model.logvar_init starts the posterior at std exp(l / 2) instead of the prior's 1; its learned
    part's KL is then 0.5 (exp(l) - 1 - l) per element, on [0, 1] input and on raw HU alike."""
    torch.manual_seed(0)
    model = VAE3D(logvar_init=-4.0, shortcut="none")
    with torch.no_grad():
        posterior = model.encode(_phantom() * scale + offset)
    assert (posterior.logvar + 4.0).abs().max() < 0.5
    expected = 0.5 * (math.exp(-4.0) - 1.0 + 4.0)
    assert abs(posterior.kl_per_element().mean().item() - expected) < 0.05
    assert VAE3D(shortcut="none").encoder.conv_out.bias.abs().max() == 0  # the default starts at the prior


def test_latent_noise_reaches_the_decoder_in_training_only():
    """model.latent_noise adds N(0, s^2) to the decoder's latent in training mode, drawn from the step's
    generator; eval mode, encode and decode never see it."""
    torch.manual_seed(0)
    model = VAE3D(**TINY, logvar_init=-10.0, latent_noise=0.1)  # posterior std 0.007: the rest is the noise
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        mean = model.encode(x).mean
        model.train()
        model(x, generator=torch.Generator().manual_seed(1))
        model(x, generator=torch.Generator().manual_seed(1))
        model.eval()
        model(x)
    offset = seen[0] - mean
    assert abs(offset.std().item() - 0.1) < 0.02 and abs(offset.mean().item()) < 0.02
    assert torch.equal(seen[0], seen[1])  # the same generator, the same noise: ranks and resume agree
    assert torch.equal(seen[2], mean)  # eval: the posterior mean, no noise
    with pytest.raises(ValueError, match="latent_noise"):
        VAE3D(**TINY, latent_noise=-0.1)


def test_train_mode_samples_and_eval_mode_uses_mean():
    torch.manual_seed(0)
    model = VAE3D(**TINY)
    for p in model.parameters():  # move away from the near-prior init so sampling is visible
        p.data.normal_(0, 0.1)
    x = torch.rand(1, 1, 8, 8, 8)
    model.eval()
    with torch.no_grad():
        a, b = model(x).reconstruction, model(x).reconstruction
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(x).reconstruction
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("recompute_norm", [False, True])
def test_checkpointing_options_give_identical_gradients(gradient_checkpointing, recompute_norm):
    torch.manual_seed(0)
    ref = VAE3D(**TINY, recompute_norm=False)
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    other = VAE3D(**TINY, gradient_checkpointing=gradient_checkpointing, recompute_norm=recompute_norm)
    other.load_state_dict(ref.state_dict())
    x = torch.rand(2, 1, 8, 8, 8)
    grads = []
    for model in (ref, other):
        out = model(x, sample_posterior=False)
        (out.reconstruction.square().mean() + out.mean.square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_ref, g_other in zip(*grads):
        assert torch.allclose(g_ref, g_other, atol=1e-6, rtol=1e-5)


def test_outputs_finite_under_fp16_autocast_on_hounsfield_input():
    torch.manual_seed(0)
    model = VAE3D(**TINY)
    x = torch.rand(1, 1, 8, 8, 8) * 4000 - 1024
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    assert out.mean.dtype == torch.float32 and out.reconstruction.dtype == torch.float32
    assert torch.isfinite(out.reconstruction).all() and torch.isfinite(out.mean).all()


def test_dropout_is_active_only_in_training():
    model = VAE3D(**TINY, dropout=0.5)
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
