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
