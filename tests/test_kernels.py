"""Every optimised kernel against the reference one, forward and backward, fp32 and bf16; exact
GroupNorm statistics; bf16 on a CPU whose oneDNN has no bf16 convolution."""

import pytest
import torch
import torch.nn.functional as F
from reference_model import one_thread, perturbed  # noqa: F401 (fixture)

from medvae import VAE3D
from medvae.inference import decode_volume, encode_volume
from medvae.models import capability, kernels
from medvae.models.autograd import NormSiLUConv

pytestmark = pytest.mark.usefixtures("one_thread")

# Largest difference allowed, relative to the largest reference value.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]


def optimised_and_reference(monkeypatch, run):
    """``run()`` with the optimised kernels, then with MEDVAE_REFERENCE_KERNELS=1."""
    monkeypatch.delenv("MEDVAE_REFERENCE_KERNELS", raising=False)
    fast = run()
    monkeypatch.setenv("MEDVAE_REFERENCE_KERNELS", "1")
    reference = run()
    monkeypatch.delenv("MEDVAE_REFERENCE_KERNELS")
    return fast, reference


def assert_close(fast, reference, dtype):
    for a, b in zip(fast, reference):
        assert a.shape == b.shape
        scale = b.float().abs().max().item()
        assert scale > 0
        assert (a.float() - b.float()).abs().max().item() <= TOLERANCE[dtype] * scale


def forward_backward(fn, *inputs):
    """(output, gradients of sum(output * fixed weights) w.r.t. each input)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    (out.float() * weights.float()).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _inputs(dtype, channels=8, shape=(9, 10, 7), out_channels=8, kernel=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, *shape, generator=generator).to(dtype)
    x = kernels.channels_last(x)
    w = (0.2 * torch.randn(out_channels, channels, kernel, kernel, kernel, generator=generator)).to(dtype)
    b = (0.1 * torch.randn(out_channels, generator=generator)).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels, stride", [(1, 1), (8, 1), (8, 2)])
def test_conv3d_matches_reference(monkeypatch, dtype, channels, stride):
    if not capability.onednn_convolution_ok(dtype):
        pytest.skip(f"no optimised {dtype} convolution on this CPU: the reference kernel is the one used")
    x, w, b = _inputs(dtype, channels)
    fast, reference = optimised_and_reference(
        monkeypatch, lambda: forward_backward(lambda *t: kernels.conv3d(*t, stride, 1), x, w, b)
    )
    assert_close(fast, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_conv_matches_reference(monkeypatch, dtype):
    x, w, b = _inputs(dtype, 8, out_channels=16, kernel=1)
    fast, reference = optimised_and_reference(monkeypatch, lambda: forward_backward(kernels.pointwise_conv, x, w, b))
    assert_close(fast, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", [1, 0])
def test_subpixel_upsample_conv_matches_interpolate_then_conv(monkeypatch, dtype, padding):
    x, w, b = _inputs(dtype, 8, shape=(5, 6, 4))
    fast, reference = optimised_and_reference(
        monkeypatch, lambda: forward_backward(lambda *t: kernels.upsample_conv(*t, padding), x, w, b)
    )
    expected_shape = [2 * n if padding else 2 * n - 4 for n in x.shape[2:]]
    assert list(fast[0].shape[2:]) == expected_shape
    assert_close(fast, reference, dtype)


def _plain_norm_silu_conv(x, norm_weight, norm_bias, conv_weight, conv_bias, groups, eps):
    return F.conv3d(F.silu(F.group_norm(x, groups, norm_weight, norm_bias, eps)), conv_weight, conv_bias, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_norm_silu_conv_matches_plain_functional_calls(dtype):
    """The fused autograd node against F.group_norm -> F.silu -> F.conv3d in float64 on the same
    values, for an input whose mean is 20x its spread: gradients of x, both norm parameters and the
    conv. (Plain float32 F.group_norm is itself off by 2e-4 here, beyond this tolerance.)"""
    x, w, b = _inputs(dtype, 8, out_channels=16)
    x = (x.float() * 0.5 + 10.0).to(dtype)
    generator = torch.Generator().manual_seed(1)
    gamma = 1 + 0.1 * torch.randn(8, generator=generator)
    beta = 0.1 * torch.randn(8, generator=generator)
    w, b = (0.2 * torch.randn(16, 8, 3, 3, 3, generator=generator)), 0.1 * torch.randn(16, generator=generator)

    def fused(x, gamma, beta, w, b):
        return NormSiLUConv.apply(x, gamma, beta, w, b, 4, 1e-6, (1, 1, 1), (1, 1, 1), dtype)

    fast = forward_backward(fused, x, gamma, beta, w, b)
    exact = [t.double() for t in (x, gamma, beta, w, b)]
    reference = forward_backward(lambda *t: _plain_norm_silu_conv(*t, 4, 1e-6), *exact)
    assert_close(fast, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_statistics_and_normalize_match_float64(dtype):
    generator = torch.Generator().manual_seed(2)
    x = kernels.channels_last((0.01 * torch.randn(2, 8, 20, 16, 12, generator=generator) + 3.0).to(dtype))
    exact = x.double()
    gamma, beta = torch.rand(8, generator=generator) + 0.5, torch.randn(8, generator=generator)
    reference = F.group_norm(exact, 4, gamma.double(), beta.double(), 1e-6)
    grouped = exact.reshape(2, 4, -1)
    for with_grad in (False, True):  # the streaming reduction and the differentiable one
        source = x.detach().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            mean, rstd = kernels.group_statistics(source, 4, 1e-6)
            out = kernels.normalize(source, mean, rstd, gamma.to(dtype), beta.to(dtype))
        assert torch.allclose(mean.double(), grouped.mean(-1), rtol=1e-6, atol=0)
        assert torch.allclose(rstd.double(), torch.rsqrt(grouped.var(-1, correction=0) + 1e-6), rtol=1e-4, atol=0)
        assert out.dtype == dtype
        tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-8}[dtype]
        assert (out.double() - reference).abs().max() < tolerance * reference.abs().max()


def test_bf16_autocast_works_when_onednn_reports_no_bf16(monkeypatch):
    """With the capability check answering "no bf16" (as on an AVX2-only CPU), training steps and
    whole-volume encode/decode run under CPU bf16 autocast and stay close to float32."""
    monkeypatch.delenv("MEDVAE_REFERENCE_KERNELS", raising=False)  # this test is about the capability answer
    monkeypatch.setattr(capability, "_onednn_dtype_supported", lambda dtype: dtype == torch.float32)
    assert not capability.onednn_convolution_ok(torch.bfloat16) and capability.onednn_convolution_ok(torch.float32)
    model = perturbed(VAE3D(channels=[8, 16], norm_num_groups=4, latent_channels=2))
    x = torch.rand(1, 1, 12, 8, 10)
    reference = model(x, sample_posterior=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, sample_posterior=False)
        (out.reconstruction.float().abs().mean() + out.mean.square().mean()).backward()
        posterior = encode_volume(model, x, memory_budget=2**30)
        decoded = decode_volume(model, posterior.mean, memory_budget=2**30)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert out.reconstruction.dtype == torch.float32
    # bf16 keeps 8 significant bits: within 5% of the output's range after a dozen layers
    assert (out.reconstruction - reference.reconstruction).abs().max() < 0.05 * reference.reconstruction.abs().max()
    assert (posterior.mean - reference.mean).abs().max() < 0.05 * reference.mean.abs().max()
    assert torch.isfinite(decoded).all()
