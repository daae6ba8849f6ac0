"""An independent reference for the model's op list: plain torch.nn.functional, written out here.

``reference_run(ops, x)`` runs GroupNorm -> SiLU -> Conv3d / nearest upsample -> Conv3d / residual
adds with ``F.group_norm``, ``F.silu``, ``F.conv3d``, ``F.interpolate`` and
``F.scaled_dot_product_attention`` on the parameters the ops hold: none of medvae's kernels. In
float64 it is the ground truth the tests hold the model's float32 paths against.
"""

from __future__ import annotations

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


def reference_encode(model, x: torch.Tensor, dtype: torch.dtype = torch.float64):
    """(mean, logvar) of ``model`` (a VAE3D): the encoder's op list by ``reference_run``, plus the
    shortcut's clamped block average when ``model.arch.shortcut`` (before logvar's clamp)."""
    from medvae.models.shortcut import POOLED_LIMIT

    mean, logvar = reference_run(model.encoder.ops(), x, dtype).chunk(2, dim=1)
    if model.arch.shortcut:
        mean = mean + block_means(x.to(dtype), model.downsampling_factor).clamp(-POOLED_LIMIT, POOLED_LIMIT)
    return mean, logvar


def reference_decode(model, z: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Voxels of ``model`` (a VAE3D) from ``z``: the decoder's op list plus, with the shortcut, z's
    channel mean repeated over each f^3 block."""
    out = reference_run(model.decoder.ops(), z, dtype)
    if model.arch.shortcut:
        f = model.downsampling_factor
        out = out + z.to(dtype).mean(1, keepdim=True).repeat_interleave(f, 2).repeat_interleave(f, 3).repeat_interleave(f, 4)
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
