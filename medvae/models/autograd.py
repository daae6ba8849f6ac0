"""Custom autograd functions of the model's optimised kernels (``medvae.models.kernels``).

``NormSiLUConv``: conv3d(silu(group_norm(x))) as one autograd node.
    Saves: the input ``x``, the norm's affine parameters, the conv weight and the per-(batch,
    group) statistics (mean, rstd; float32). Not saved: the normalised and activated tensors.
    Why: plain autograd keeps the norm output and the SiLU output of every norm+act+conv (two more
    full-size tensors per call, four per residual block); this node recomputes them in backward
    from ``x`` and the saved statistics (bitwise the same values as in forward: the same
    ``kernels.normalize`` call). Backward takes the weight gradient first, drops the activation,
    then makes the input gradient and runs SiLU's and GroupNorm's backward in place in depth slabs,
    so it holds one full-size temporary at a time.

``interleave_phases``: sub-pixel upsampling's phase interleave as a strided copy.
    Saves: only the shape and memory format of its input (the copy is linear, nothing else is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvae.models import kernels
from medvae.models.kernels import norm_dtype, normalize, per_channel, slabs, suggested_format


def _activation(x, norm_weight, norm_bias, mean, rstd, conv_dtype):
    """silu(group_norm(x)) from saved statistics, in ``conv_dtype``, one full-size temporary."""
    t = normalize(x, mean, rstd, norm_weight, norm_bias)
    return F.silu(t, inplace=True).to(conv_dtype)


class NormSiLUConv(torch.autograd.Function):
    """conv3d(silu(group_norm(x))) that saves only x, the parameters and (mean, rstd) for backward."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, conv_weight, conv_bias, groups, eps, stride, padding, conv_dtype):
        with torch.autocast(device_type=x.device.type, enabled=False):
            mean, rstd = kernels.group_statistics(x, groups, eps)
            activation = _activation(x, norm_weight, norm_bias, mean, rstd, conv_dtype)
            bias = None if conv_bias is None else conv_bias.to(conv_dtype)
            y = kernels.conv3d(activation, conv_weight.to(conv_dtype), bias, stride, padding)
        ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, mean, rstd)
        ctx.groups, ctx.stride, ctx.padding, ctx.conv_dtype = groups, stride, padding, conv_dtype
        ctx.has_bias = conv_bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, norm_weight, norm_bias, conv_weight, mean, rstd = ctx.saved_tensors
        conv_dtype = ctx.conv_dtype
        need_x, need_nw, need_nb, need_cw, need_cb = ctx.needs_input_grad[:5]
        need_norm = need_x or need_nw or need_nb
        need_cb = need_cb and ctx.has_bias
        grad_x = grad_nw = grad_nb = grad_cw = grad_cb = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            activation = _activation(x, norm_weight, norm_bias, mean, rstd, conv_dtype)
            fmt = suggested_format(activation)
            grad_y = grad_y.to(conv_dtype).contiguous(memory_format=fmt)
            weight = conv_weight.to(conv_dtype)
            bias_sizes = [conv_weight.shape[0]] if ctx.has_bias else None
            stride, padding = [int(s) for s in ctx.stride], [int(p) for p in ctx.padding]
            conv_args = (bias_sizes, stride, padding, [1, 1, 1], False, [0, 0, 0], 1)
            # Weight gradient first, then drop the activation before the input gradient is made: one
            # full-size temporary at a time. The input gradient reads only the shape of ``input``.
            split = need_norm and x.dtype == conv_dtype and suggested_format(x) is fmt
            grad_activation, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
                grad_y, activation, weight, *conv_args, [need_norm and not split, need_cw, need_cb]
            )
            del activation
            if split:
                grad_activation = torch.ops.aten.convolution_backward(grad_y, x, weight, *conv_args, [True, False, False])[0]
            del grad_y
            if need_norm:
                grad_activation = grad_activation.contiguous(memory_format=fmt).to(norm_dtype(x))
                grad_x, grad_nw, grad_nb = silu_group_norm_backward(
                    grad_activation, x, mean, rstd, norm_weight, norm_bias, ctx.groups
                )
        grad_cw = None if grad_cw is None else grad_cw.to(conv_weight.dtype)
        grad_cb = None if grad_cb is None else grad_cb.to(conv_weight.dtype)
        return grad_x, grad_nw, grad_nb, grad_cw, grad_cb, None, None, None, None, None


def silu_group_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of silu(group_norm(x)) w.r.t. x, weight and bias, given ``grad`` = d loss / d output.

    With g = grad * silu'(t) (t the norm output, recomputed from the saved statistics), GroupNorm's
    dx = rstd * (gamma * g - mean_group(gamma * g) - xhat * mean_group(gamma * g * xhat)) is written
    as A_c * g + B_c * (x - m_c) + C_c with per-(sample, channel) coefficients from two channel
    sums, x centred on its group mean m_c before every product (exact where mean >> std). The work
    runs in depth slabs, in place in ``grad`` (which becomes dx): one slab-sized temporary.
    ``grad`` is float32 (float64 for a float64 model) whatever x's dtype.
    """
    b, c = x.shape[:2]
    per_group = c // groups
    count = per_group * x[0, 0].numel()
    dims = (2, 3, 4)
    shape = (b, c, 1, 1, 1)
    dtype = grad.dtype
    mean_c, rstd_c = per_channel(mean.to(dtype), c), per_channel(rstd.to(dtype), c)  # (B, C)
    pieces = slabs(grad)
    work = torch.empty((b, c, pieces[0].stop, *x.shape[3:]), dtype=dtype, device=x.device, memory_format=suggested_format(grad))
    sum_g = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    sum_g_centred = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    for depth in pieces:
        g, xs, tmp = grad[:, :, depth], x[:, :, depth], work[:, :, : depth.stop - depth.start]
        t = normalize(xs, mean, rstd, weight, bias, out=tmp) if xs.dtype == dtype else normalize(xs, mean, rstd, weight, bias)
        torch.ops.aten.silu_backward.grad_input(g, t.to(dtype), grad_input=g)
        sum_g += g.sum(dims).double()
        centred = torch.sub(xs, mean_c.view(shape), out=tmp)
        sum_g_centred += centred.mul_(g).sum(dims).double()
    sum_g_xhat = rstd_c.double() * sum_g_centred  # sum over voxels of g * xhat
    gamma = weight.double()
    grad_weight = sum_g_xhat.sum(0).to(weight.dtype)
    grad_bias = sum_g.sum(0).to(weight.dtype)
    a_c = per_channel((gamma * sum_g).view(b, groups, per_group).sum(-1) / count, c)  # mean_group(gamma * g)
    b_c = per_channel((gamma * sum_g_xhat).view(b, groups, per_group).sum(-1) / count, c)  # mean_group(gamma g xhat)
    rstd_d = rstd_c.double()
    coef_g = (rstd_d * gamma).to(dtype).view(shape)
    coef_centred = (-rstd_d * rstd_d * b_c).to(dtype).view(shape)
    const = (-rstd_d * a_c).to(dtype).view(shape)
    for depth in pieces:
        g, xs, tmp = grad[:, :, depth], x[:, :, depth], work[:, :, : depth.stop - depth.start]
        torch.addcmul(const, g, coef_g, out=g)
        g.addcmul_(torch.sub(xs, mean_c.view(shape), out=tmp), coef_centred)
    return grad.to(x.dtype), grad_weight, grad_bias


def _phase_view(y8: torch.Tensor) -> torch.Tensor:
    """(B, 8C, n+1, n+1, n+1) phase-major conv output -> strided view (B, C, n, 2, n, 2, n, 2)
    whose element [b, c, i, p, j, q, k, r] is output voxel (2i+p, 2j+q, 2k+r): phase (p, q, r)
    read at offset (i+p, j+q, k+r)."""
    b, c8, d1, h1, w1 = y8.shape
    c = c8 // 8
    sb, sc, sd, sh, sw = y8.stride()
    size = (b, c, d1 - 1, 2, h1 - 1, 2, w1 - 1, 2)
    stride = (sb, sc, sd, 4 * c * sc + sd, sh, 2 * c * sc + sh, sw, c * sc + sw)
    return y8.as_strided(size, stride, y8.storage_offset())


class _InterleavePhases(torch.autograd.Function):
    """(B, 8C, n+1, n+1, n+1) phase outputs -> (B, C, 2n, 2n, 2n) in memory format ``fmt``."""

    @staticmethod
    def forward(ctx, y8, fmt):
        b, c8, d1, h1, w1 = y8.shape
        shape = (b, c8 // 8, 2 * (d1 - 1), 2 * (h1 - 1), 2 * (w1 - 1))
        out = torch.empty(shape, dtype=y8.dtype, device=y8.device, memory_format=fmt)
        out.view(_phase_view(y8).shape).copy_(_phase_view(y8))
        ctx.y8_shape, ctx.fmt = y8.shape, fmt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_y8 = torch.empty(ctx.y8_shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=ctx.fmt)
        for axis in (2, 3, 4):  # only the first and last planes hold entries no output voxel reads
            grad_y8.narrow(axis, 0, 1).zero_()
            grad_y8.narrow(axis, grad_y8.shape[axis] - 1, 1).zero_()
        view = _phase_view(grad_y8)
        view.copy_(grad_out.view(view.shape))
        return grad_y8, None


def interleave_phases(y8: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """(B, 8C, n+1, n+1, n+1) phase-major sub-pixel conv output -> (B, C, 2n, 2n, 2n) in ``fmt``."""
    return _InterleavePhases.apply(y8, fmt)
