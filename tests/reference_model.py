"""An independent reference for the model's op list: plain torch.nn.functional, written out here.

``reference_run(ops, x)`` runs GroupNorm -> SiLU -> Conv3d / nearest upsample -> Conv3d / residual
adds with ``F.group_norm``, ``F.silu``, ``F.conv3d``, ``F.interpolate`` and
``F.scaled_dot_product_attention`` on the parameters the ops hold: none of medvae's kernels. In
float64 it is the ground truth the tests hold the model's float32 paths against.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvae.models.ops import (
    Activation,
    Conv,
    Dropout,
    NearestUpsampleConv,
    Norm,
    ResidualClose,
    ResidualOpen,
    SelfAttention,
)


def _conv(x, conv, dtype):
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return F.conv3d(x.to(dtype), conv.weight.to(dtype), bias, conv.stride, conv.padding)


def _group_norm(x, norm, dtype):
    return F.group_norm(x.to(dtype), norm.num_groups, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)


def reference_run(ops, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Run ``ops`` (a block's ``ops()``) on ``x`` in ``dtype`` with plain functional calls."""
    held = []
    x = x.to(dtype)
    for op in ops:
        if isinstance(op, ResidualOpen):
            held.append(x)
        elif isinstance(op, ResidualClose):
            skip = held.pop()
            x = x + (skip if op.skip is None else _conv(skip, op.skip, dtype))
        elif isinstance(op, Norm):
            x = _group_norm(x, op.norm, dtype)
        elif isinstance(op, Activation):
            x = F.silu(x)
        elif isinstance(op, Dropout):
            x = op.module(x)
        elif isinstance(op, Conv):
            x = _conv(x, op.conv, dtype)
        elif isinstance(op, NearestUpsampleConv):
            x = _conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), op.conv, dtype)
        elif isinstance(op, SelfAttention):
            m = op.module
            b, c, d, h, w = x.shape
            qkv = _conv(_group_norm(x, m.norm, dtype), m.qkv, dtype).reshape(b, 3, m.num_heads, c // m.num_heads, d * h * w)
            q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))
            out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, d, h, w)
            x = x + _conv(out, m.proj, dtype)
        else:
            raise TypeError(f"reference_run: no reference for {op!r}")
    return x


def block_means(x: torch.Tensor, f: int) -> torch.Tensor:
    """Each f^3 block's mean over all channels, by reshaping: (B, 1, D/f, H/f, W/f)."""
    b, c, d, h, w = x.shape
    return x.reshape(b, c, d // f, f, h // f, f, w // f, f).mean(dim=(1, 3, 5, 7)).unsqueeze(1)


def dct_matrix(f: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (frequency, position) in float64, from its textbook formula."""
    n = torch.arange(f, dtype=torch.float64)
    scale = torch.full((f, 1), math.sqrt(2.0 / f), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / f)
    return scale * torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * f))


def lowest_frequencies(f: int, count: int) -> list[tuple[int, int, int]]:
    """The first ``count`` (kd, kh, kw): by total frequency, then the largest one, then lexicographic."""
    triples = [(a, b, c) for a in range(f) for b in range(f) for c in range(f)]
    return sorted(triples, key=lambda t: (t[0] + t[1] + t[2], max(t), t))[:count]


def block_code(x: torch.Tensor, kind: str, f: int, latent_channels: int) -> torch.Tensor:
    """The shortcut's code of x's blocks, unclamped, in float64: (B, L, D/f, H/f, W/f). ``"mean"``:
    the block mean on every channel; ``"dct"``: the L lowest 3-D DCT coefficients of x's channel mean,
    divided by sqrt(f^3) so that the constant's coefficient is the block mean."""
    if kind == "mean":
        return block_means(x.double(), f).expand(-1, latent_channels, -1, -1, -1)
    b, _, d, h, w = x.shape
    blocks = x.double().mean(1).reshape(b, d // f, f, h // f, f, w // f, f)
    m = dct_matrix(f)
    coefficients = torch.einsum("bdihjwk,pi,qj,rk->bpqrdhw", blocks, m, m, m) / math.sqrt(f**3)
    channels = [coefficients[:, p, q, r] for p, q, r in lowest_frequencies(f, latent_channels)]
    channels += [torch.zeros_like(channels[0])] * (latent_channels - len(channels))
    return torch.stack(channels, 1)


def block_decode(z: torch.Tensor, kind: str, f: int) -> torch.Tensor:
    """The voxels the shortcut's decoder adds for the code z, in float64: (B, 1, d*f, h*f, w*f)."""
    z = z.double()
    if kind == "mean":
        return z.mean(1, keepdim=True).repeat_interleave(f, 2).repeat_interleave(f, 3).repeat_interleave(f, 4)
    b, latent, d, h, w = z.shape
    coefficients = torch.zeros(b, f, f, f, d, h, w, dtype=torch.float64)
    for channel, (p, q, r) in enumerate(lowest_frequencies(f, latent)):
        coefficients[:, p, q, r] = z[:, channel]
    m = dct_matrix(f)
    blocks = torch.einsum("bpqrdhw,pi,qj,rk->bdihjwk", coefficients, m, m, m) * math.sqrt(f**3)
    return blocks.reshape(b, 1, d * f, h * f, w * f)


def reference_encode(model, x: torch.Tensor, dtype: torch.dtype = torch.float64):
    """(mean, logvar) of ``model`` (a VAE3D): the encoder's op list by ``reference_run``, plus the
    shortcut's clamped block code (before logvar's clamp)."""
    from medvae.models.shortcut import POOLED_LIMIT

    mean, logvar = reference_run(model.encoder.ops(), x, dtype).chunk(2, dim=1)
    kind = model.arch.shortcut
    if kind != "none":
        code = block_code(x, kind, model.downsampling_factor, mean.shape[1]).clamp(-POOLED_LIMIT, POOLED_LIMIT)
        mean = mean + code.to(dtype)
    return mean, logvar


def reference_decode(model, z: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Voxels of ``model`` (a VAE3D) from ``z``: the decoder's op list plus the shortcut's decoded blocks."""
    out = reference_run(model.decoder.ops(), z, dtype)
    kind = model.arch.shortcut
    if kind != "none":
        out = out + block_decode(z, kind, model.downsampling_factor).to(dtype)
    return out


def perturbed(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved by N(0, scale): zero-initialised residual branches count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is much faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
