import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from medvae import DiagonalGaussian


@pytest.mark.parametrize("prior_std", [1.0, 2.5])
def test_kl_matches_torch_distributions(prior_std):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, 7, generator=g) * 2
    logvar = torch.randn(3, 4, 5, 6, 7, generator=g)
    ours = DiagonalGaussian(mean, logvar).kl(prior_std=prior_std)
    ref = kl_divergence(
        Normal(mean.double(), torch.exp(0.5 * logvar.double())), Normal(0.0, float(prior_std))
    ).flatten(1).sum(1)
    assert ours.shape == (3,)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_is_float32_under_autocast(dtype):
    mean = torch.randn(2, 3, 4, 4, 4)
    logvar = torch.randn(2, 3, 4, 4, 4)
    with torch.autocast("cpu", dtype=dtype):
        low = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(4, 4))
        assert low.dtype == dtype  # autocast really is active
        posterior = DiagonalGaussian(mean.to(dtype), logvar.to(dtype))
        kl = posterior.kl()
        sample = posterior.sample()
    assert kl.dtype == torch.float32
    assert sample.dtype == torch.float32
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("value", [1e4, -1e4])
def test_kl_and_gradient_finite_at_extremes(value):
    mean = torch.full((2, 3, 2, 2, 2), value, requires_grad=True)
    logvar = torch.full((2, 3, 2, 2, 2), value, requires_grad=True)
    kl = DiagonalGaussian(mean, logvar).kl().sum()
    kl.backward()
    assert torch.isfinite(kl)
    assert torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()
    # the clamp keeps a gradient that points back towards the prior
    assert (logvar.grad.sign() == math.copysign(1, value)).all()


def test_kl_gradient_is_bounded_for_fp16_inputs():
    logvar = torch.full((1, 1, 2, 2, 2), 60000.0, dtype=torch.float16, requires_grad=True)
    mean = torch.zeros((1, 1, 2, 2, 2), dtype=torch.float16, requires_grad=True)
    DiagonalGaussian(mean, logvar).kl().sum().backward()
    assert torch.isfinite(logvar.grad).all()
    assert logvar.grad.float().abs().max() < 2e4


def test_mode_is_mean_and_sample_reproducible():
    mean = torch.randn(1, 2, 3, 3, 3)
    posterior = DiagonalGaussian(mean, torch.zeros_like(mean))
    assert torch.equal(posterior.mode(), mean)
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_bad_prior_std():
    posterior = DiagonalGaussian(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="prior_std"):
        posterior.kl(prior_std=0.0)
