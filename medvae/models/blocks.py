"""Building blocks of the 3D VAE: norm+activation+conv, residual block, down/upsampling, attention.

All tensors are (B, C, D, H, W). Pure torch.nn: no files, no configs.

What makes these blocks faster and leaner than a plain GroupNorm -> SiLU -> Conv3d stack (each
choice measured in benchmarks/ablate_blocks.py; numbers in benchmarks/RESULTS.md):

- ``norm_silu_conv`` runs GroupNorm, SiLU and the following convolution as one autograd node that
  keeps only its input (plus per-group mean and 1/std) for backward: a residual block stores 2
  activation tensors instead of 6. Its backward recomputes the activation, takes the weight
  gradient before making the input gradient, and runs the SiLU and GroupNorm backward in place in
  depth slabs, so it never holds more than one full-size temporary.
- Channels-last (``channels_last_3d``) end to end: ``_conv`` calls oneDNN directly so that small
  and single-channel volumes do not fall back to a slower kernel with contiguous output; the 1x1
  skip projection is a matrix product over the channel axis.
- ``Upsample`` computes "nearest x2, then 3x3x3 conv" exactly, as a 2x2x2 conv with 8x the output
  channels on the coarse grid whose phases are interleaved (sub-pixel form): 8/27 of the flops, and
  the upsampled tensor is never built. The parameter is still the 3x3x3 kernel.
- The residual add is in place (the conv output it writes into is saved by nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medvae.models.capability import onednn_convolution_ok


def _suggested_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d if ``x`` is laid out that way (a single channel counts when its stride is 1,
    as ``channels_last`` makes it), else contiguous."""
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        if not x.is_contiguous() or (x.shape[1] == 1 and x.stride(1) == 1 and x[0, 0].numel() > 1):
            return torch.channels_last_3d
    return torch.contiguous_format


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last_3d layout, unambiguously: a single-channel tensor gets channel stride 1
    (a view), so that convolutions see channels-last input and return channels-last output."""
    if x.shape[1] == 1 and x.is_contiguous():
        b, _, d, h, w = x.shape
        return x.as_strided(x.shape, (d * h * w, 1, h * w, w, 1))
    return x.contiguous(memory_format=torch.channels_last_3d)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """conv3d whose output keeps the layout of ``x``.

    On CPU with channels-last input this calls the oneDNN kernel directly: PyTorch's heuristic
    sends small or single-channel fp32 volumes to a fallback kernel that is slower and returns
    contiguous output (which then costs a layout copy, forward and backward).
    """
    fmt = _suggested_format(x)
    if (
        x.device.type == "cpu"
        and fmt is torch.channels_last_3d
        and x.dtype == weight.dtype
        and onednn_convolution_ok(x.dtype)
    ):
        stride, padding = _triple(stride), _triple(padding)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding).contiguous(memory_format=fmt)


def _triple(v) -> list[int]:
    return [int(v)] * 3 if isinstance(v, int) else [int(i) for i in v]


def conv3d(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` under autocast rules, keeping the memory format of ``x`` (see ``_conv``)."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = None if conv.bias is None else conv.bias.to(dtype)
        weight = conv.weight.to(dtype)
        if weight.shape[1] == 1 and _suggested_format(x) is torch.channels_last_3d:
            weight = channels_last(weight)
        return _conv(x.to(dtype), weight, bias, conv.stride, conv.padding)


def pointwise_conv(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A 1x1x1 convolution; on channels-last input a matrix product over the channel axis."""
    if _suggested_format(x) is torch.channels_last_3d:
        out = F.linear(x.permute(0, 2, 3, 4, 1), conv.weight.flatten(1), conv.bias)  # (B, D, H, W, C_out)
        return out.permute(0, 4, 1, 2, 3)
    return conv(x)


def _group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # fp16 activations can hold values whose squares overflow; normalise those in float32.
    # bf16 has float32's exponent range and CPU kernels accumulate its statistics in float32.
    if x.dtype == torch.float16:
        y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
        return F.silu(y).to(torch.float16)
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm followed by SiLU.

    ``recompute=True`` lets ``norm_silu_conv`` keep only this layer's input for backward and redo
    the normalisation there, instead of storing the normalised and activated tensors.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, recompute: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype group norm computes in: float32 for fp16 (its squares can overflow) and, on CUDA,
    for any half precision (as CUDA autocast does); else the input's dtype."""
    if x.dtype == torch.float16 or (x.device.type != "cpu" and x.dtype == torch.bfloat16):
        return torch.float32
    return x.dtype


def _group_norm(x: torch.Tensor, norm: GroupNormSiLU) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """group_norm(x) with its statistics: (output t, mean, rstd), mean and rstd (B, groups) float32.

    PyTorch's kernel, which accumulates in float32 for every input dtype; fp16 input is normalised in
    float32 (its squares can overflow), and on CUDA any half-precision input. The output keeps the
    layout of ``x``.
    """
    b, c = x.shape[:2]
    fmt = _suggested_format(x)
    source = x.to(_norm_dtype(x))
    args = (norm.weight, norm.bias, b, c, x[0, 0].numel(), norm.num_groups, norm.eps)
    if x.device.type != "cpu":  # the CUDA kernel takes contiguous input only
        t, mean, rstd = torch.native_group_norm(source.contiguous(), *args)
        return t.contiguous(memory_format=fmt), mean, rstd
    return torch.native_group_norm(source.contiguous(memory_format=fmt), *args)


def _per_channel(stat: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, groups) -> (B, C) float32, each group's value repeated for its channels."""
    return stat.float().repeat_interleave(channels // stat.shape[1], dim=1)


def _group_norm_from_stats(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """group_norm(x) written into ``out`` as x * scale + shift, from saved (B, groups) statistics:
    one pass, no reduction. Used for SiLU's derivative, where last-bit differences do not matter."""
    b, c = x.shape[:2]
    scale = _per_channel(rstd, c) * weight.float()
    shift = bias.float() - _per_channel(mean, c) * scale
    return torch.addcmul(shift.to(out.dtype).view(b, c, 1, 1, 1), x, scale.to(out.dtype).view(b, c, 1, 1, 1), out=out)


def _norm_silu_conv_forward(
    x: torch.Tensor, norm: GroupNormSiLU, conv: nn.Conv3d, conv_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv(silu(norm(x))), mean, rstd) with one temporary (SiLU in place), autocast off."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        t, mean, rstd = _group_norm(x, norm)
        activation = F.silu(t, inplace=True).to(conv_dtype)
        del t
        bias = None if conv.bias is None else conv.bias.to(conv_dtype)
        return _conv(activation, conv.weight.to(conv_dtype), bias, conv.stride, conv.padding), mean, rstd


class _NormSiLUConv(torch.autograd.Function):
    """conv3d(silu(group_norm(x))) that saves only x, mean and rstd for backward."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, conv_weight, conv_bias, norm, conv, conv_dtype):
        # The parameters are passed in (not only read from the modules) so that autograd sees them.
        y, mean, rstd = _norm_silu_conv_forward(x, norm, conv, conv_dtype)
        ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, mean, rstd)
        ctx.norm, ctx.conv, ctx.conv_dtype, ctx.has_bias = norm, conv, conv_dtype, conv_bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, norm_weight, norm_bias, conv_weight, mean, rstd = ctx.saved_tensors
        norm, conv, conv_dtype = ctx.norm, ctx.conv, ctx.conv_dtype
        need_x, need_nw, need_nb, need_cw, need_cb = ctx.needs_input_grad[:5]
        need_norm = need_x or need_nw or need_nb
        need_cb = need_cb and ctx.has_bias
        grad_x = grad_nw = grad_nb = grad_cw = grad_cb = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            # Recompute the activation with the forward's kernel: bitwise the same as in forward.
            t, _, _ = _group_norm(x, norm)
            activation = F.silu(t, inplace=True).to(conv_dtype)
            del t
            fmt = _suggested_format(activation)
            grad_y = grad_y.to(conv_dtype).contiguous(memory_format=fmt)
            weight = conv_weight.to(conv_dtype)
            bias_sizes = [conv_weight.shape[0]] if ctx.has_bias else None
            conv_args = (bias_sizes, list(conv.stride), list(conv.padding), [1, 1, 1], False, [0, 0, 0], 1)
            # Weight gradient first, then drop the activation before the input gradient is made: one
            # full-size temporary at a time. The input gradient reads only the shape of ``input``.
            split = need_norm and x.dtype == conv_dtype and _suggested_format(x) is fmt
            grad_activation, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
                grad_y, activation, weight, *conv_args, [need_norm and not split, need_cw, need_cb]
            )
            del activation
            if split:
                grad_activation = torch.ops.aten.convolution_backward(grad_y, x, weight, *conv_args, [True, False, False])[0]
            del grad_y
            if need_norm:
                grad_activation = grad_activation.contiguous(memory_format=fmt).to(_norm_dtype(x))
                grad_x, grad_nw, grad_nb = _silu_group_norm_backward(
                    grad_activation, x, mean, rstd, norm_weight, norm_bias, norm.num_groups
                )
        grad_cw = None if grad_cw is None else grad_cw.to(conv_weight.dtype)
        grad_cb = None if grad_cb is None else grad_cb.to(conv_weight.dtype)
        return grad_x, grad_nw, grad_nb, grad_cw, grad_cb, None, None, None


# Depth slabs of about this many bytes bound the temporary of the SiLU/GroupNorm backward; smaller
# tensors go in one piece (every slab is a few more kernel launches, each a thread barrier).
SLAB_BYTES = 32 * 2**20


def _slabs(x: torch.Tensor) -> list[slice]:
    """Slices along depth that cut ``x`` into pieces of at most about SLAB_BYTES (on CPU; on a GPU,
    where every slab costs kernel launches that dominate at these sizes, one piece)."""
    n = x.shape[2]
    parts = 1 if x.device.type != "cpu" else min(n, max(1, -(-x.numel() * x.element_size() // SLAB_BYTES)))
    step = -(-n // parts)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _silu_group_norm_backward(
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
    as A_c * g + B_c * (x - m_c) + C_c with per-(sample, channel) float32 coefficients from two
    channel sums; in half precision m_c is the group mean rounded to g's dtype, so the sums stay
    well conditioned (float32 uses m_c = 0). The work runs in depth slabs, in place in ``grad``
    (which becomes dx): one slab-sized temporary instead of full-size ones. Plain tensor ops,
    because PyTorch's channels-last CPU kernel is slow for 1-2 channels per group (very slow in bf16).
    """
    b, c = x.shape[:2]
    per_group = c // groups
    count = per_group * x[0, 0].numel()
    dims = (2, 3, 4)
    shape = (b, c, 1, 1, 1)
    dtype = grad.dtype
    mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)  # (B, C)
    # float32 sums of g * x are accurate enough uncentred (one kernel fewer per slab); half
    # precision centres x on its rounded group mean first.
    centre = dtype != torch.float32
    mean_rounded = mean_c.to(dtype) if centre else torch.zeros_like(mean_c)
    shift = mean_rounded.float() - mean_c  # x - mean = (x - mean_rounded) + shift
    slabs = _slabs(grad)
    work = torch.empty((b, c, slabs[0].stop, *x.shape[3:]), dtype=dtype, device=x.device, memory_format=_suggested_format(grad))
    sum_g = torch.zeros(b, c, device=x.device)
    sum_g_centred = torch.zeros(b, c, device=x.device)
    for depth in slabs:
        g, xs, tmp = grad[:, :, depth], x[:, :, depth], work[:, :, : depth.stop - depth.start]
        t = _group_norm_from_stats(xs, mean, rstd, weight, bias, out=tmp)
        torch.ops.aten.silu_backward.grad_input(g, t, grad_input=g)
        sum_g += g.sum(dims).float()
        centred = torch.sub(xs, mean_rounded.view(shape), out=tmp) if centre else xs
        sum_g_centred += torch.mul(centred, g, out=tmp).sum(dims).float()
    sum_g_xhat = rstd_c * (sum_g_centred + shift * sum_g)  # sum over voxels of g * xhat
    gamma = weight.float()
    grad_weight = sum_g_xhat.sum(0).to(weight.dtype)
    grad_bias = sum_g.sum(0).to(weight.dtype)
    a_c = _per_channel((gamma * sum_g).view(b, groups, per_group).sum(-1) / count, c)  # mean_group(gamma * g)
    b_c = _per_channel((gamma * sum_g_xhat).view(b, groups, per_group).sum(-1) / count, c)  # mean_group(gamma g xhat)
    coef_g = (rstd_c * gamma).to(dtype).view(shape)
    coef_centred = (-rstd_c * rstd_c * b_c).to(dtype).view(shape)
    const = (-rstd_c * a_c + -rstd_c * rstd_c * b_c * shift).to(dtype).view(shape)
    for depth in slabs:
        g, xs, tmp = grad[:, :, depth], x[:, :, depth], work[:, :, : depth.stop - depth.start]
        torch.addcmul(const, g, coef_g, out=g)
        g.addcmul_(torch.sub(xs, mean_rounded.view(shape), out=tmp) if centre else xs, coef_centred)
    return grad.to(x.dtype), grad_weight, grad_bias


def norm_silu_conv(x: torch.Tensor, norm: GroupNormSiLU, conv: nn.Conv3d, float32: bool = False) -> torch.Tensor:
    """conv(silu(norm(x))): (B, C_in, D, H, W) -> (B, C_out, D', H', W').

    The convolution runs in the autocast dtype, or in float32 when ``float32`` (the model's output
    convolutions). With ``norm.recompute`` and gradients on, this is one autograd node that stores
    only ``x`` (see ``_NormSiLUConv``); otherwise the plain modules run one after another.
    """
    device = x.device.type
    if float32 or not torch.is_autocast_enabled(device):
        conv_dtype = torch.float32 if float32 else conv.weight.dtype
    else:
        conv_dtype = torch.get_autocast_dtype(device)
    if norm.recompute and torch.is_grad_enabled():
        return _NormSiLUConv.apply(x, norm.weight, norm.bias, conv.weight, conv.bias, norm, conv, conv_dtype)
    if not torch.is_grad_enabled():  # inference: SiLU in place, one temporary
        return _norm_silu_conv_forward(x, norm, conv, conv_dtype)[0]
    h = norm(x)  # plain autograd: keeps the norm output and the activation for backward
    if float32:
        with torch.autocast(device_type=device, enabled=False):
            return conv3d(h.float(), conv)
    return conv3d(h, conv)


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), with a 1x1 projection when channels change.

    The second convolution starts at zero, so every block is the identity at initialisation and the
    network's output scale does not grow with depth.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        recompute_norm: bool = True,
    ):
        super().__init__()
        self.norm1 = GroupNormSiLU(norm_num_groups, in_channels, norm_eps, recompute_norm)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormSiLU(norm_num_groups, out_channels, norm_eps, recompute_norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = norm_silu_conv(x, self.norm1, self.conv1)
        if isinstance(self.dropout, nn.Dropout) and self.training:
            h = conv3d(self.dropout(self.norm2(h)), self.conv2)
        else:
            h = norm_silu_conv(h, self.norm2, self.conv2)
        # In place: h is a fresh conv output that nothing saved for backward.
        skip = pointwise_conv(x, self.skip) if isinstance(self.skip, nn.Conv3d) else x
        return h.add_(skip)


class Downsample(nn.Module):
    """Strided 3x3x3 convolution: (B, C, D, H, W) -> (B, C, D/2, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.conv)


# Nearest x2 then a 3-tap kernel w[0..2] (offsets -1, 0, +1) gives, per axis,
#   y[2i]     = w[0] x[i-1] + (w[1] + w[2]) x[i]
#   y[2i + 1] = (w[0] + w[1]) x[i] + w[2] x[i+1]
# i.e. for output phase p a 2-tap kernel _PHASE_TAPS[p] @ w over x[i-1+p], x[i+p].
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase, tap, k)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) kernel -> (8 * C_out, C_in, 2, 2, 2), phase-major (autocast off)."""
    taps = _PHASE_TAPS.to(weight)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        w = torch.einsum("pak,qbl,rcm,oiklm->pqroiabc", taps, taps, taps, weight)
    return w.reshape(8 * weight.shape[0], weight.shape[1], 2, 2, 2)


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


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3x3 convolution (no checkerboard from transposed convs).

    Computed in sub-pixel form (see ``subpixel_weight``): same result up to float rounding, 8/27 of
    the flops, and no upsampled tensor in memory. ``conv`` holds the 3x3x3 kernel.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight = subpixel_weight(self.conv.weight).to(dtype)
        bias = self.conv.bias.repeat(8).to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _InterleavePhases.apply(_conv(x.to(dtype), weight, bias, 1, 1), _suggested_format(x))


class Attention(nn.Module):
    """Multi-head self-attention over all voxels of the lowest-resolution grid, with a residual."""

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, norm_eps: float = 1e-6):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, d * h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, d, h, w)
        return x + self.proj(out)


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (only built when attention is on)."""

    def __init__(self, channels: int, num_heads: int, norm_num_groups: int, norm_eps: float, dropout: float, recompute_norm: bool):
        super().__init__()
        self.res_in = ResBlock(channels, channels, norm_num_groups, norm_eps, dropout, recompute_norm)
        self.attention = Attention(channels, num_heads, norm_num_groups, norm_eps)
        self.res_out = ResBlock(channels, channels, norm_num_groups, norm_eps, dropout, recompute_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_out(self.attention(self.res_in(x)))


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Run ``block``; under activation checkpointing keep only its input for backward."""
    if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(block, x, use_reentrant=False)
    return block(x)
