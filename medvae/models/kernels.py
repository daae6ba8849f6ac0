"""The kernels every op of the model runs on: one reference set and the optimised ones, chosen here.

Both the model's own forward (``medvae.models.ops.run_ops``) and the memory-bounded whole-volume
runner (``medvae.inference``) call these functions, so a change here changes both paths alike.

Reference kernels use ``torch.nn.functional`` and plain tensor ops only; they are correct on every
device and dtype. Optimised kernels are picked per call by capability (``medvae.models.capability``):

- ``conv3d``: on CPU with a channels-last input, a direct oneDNN call where torch reports that
  dtype as supported (keeps the layout, avoids the im2col fallback for small or 1-channel volumes);
  elsewhere ``F.conv3d`` (cuDNN on CUDA, channels-last when the model is).
- ``upsample_conv``: "nearest x2, then 3x3x3 conv" as a 2x2x2 conv with 8x the output channels on
  the coarse grid, phases interleaved (sub-pixel form): 8/27 of the flops, no upsampled tensor.
  Reference: ``F.interpolate(mode="nearest")`` then ``F.conv3d``.
- ``pointwise_conv``: a 1x1x1 conv as a matrix product over the channel axis on channels-last input.

GroupNorm has one implementation (plain tensor ops), exact in every path: per-channel mean and
centred sum of squares (float32, computed in depth slabs so no full-size temporary is made), merged
into groups in float64 with Chan's formula (``channel_moments`` / ``merge_groups``). The memory-bounded
runner folds the per-tile moments of the same function into whole-volume statistics.

``MEDVAE_REFERENCE_KERNELS=1`` selects the reference kernels everywhere (and turns off the fused
norm+activation+conv autograd node of ``medvae.models.autograd``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medvae.models.capability import onednn_convolution_ok, reference_kernels_forced

# Depth slabs of about this many bytes bound the temporaries of the GroupNorm statistics and of the
# fused block's backward on the CPU (larger ones thrash the cache, smaller ones cost launches).
SLAB_BYTES = 32 * 2**20


def use_optimised() -> bool:
    """False when ``MEDVAE_REFERENCE_KERNELS=1`` forces the reference kernels."""
    return not reference_kernels_forced()


# ----------------------------------------------------------------------------------------- layout


def suggested_format(x: torch.Tensor) -> torch.memory_format:
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


def slabs(x: torch.Tensor) -> list[slice]:
    """Slices along depth that cut ``x`` into pieces of at most about SLAB_BYTES (on CPU; on a GPU,
    where every slab costs kernel launches that dominate at these sizes, one piece)."""
    n = x.shape[2]
    parts = 1 if x.device.type != "cpu" else min(n, max(1, -(-x.numel() * x.element_size() // SLAB_BYTES)))
    step = -(-n // parts)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _triple(v) -> list[int]:
    return [int(v)] * 3 if isinstance(v, int) else [int(i) for i in v]


# ----------------------------------------------------------------------------------- convolutions


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """conv3d of tensors already in one dtype (autocast off): (B, C_in, D, H, W) -> (B, C_out, ...).

    Optimised on CPU channels-last input where oneDNN supports the dtype (output keeps the layout);
    else ``F.conv3d``, the reference.
    """
    fmt = suggested_format(x)
    if fmt is torch.channels_last_3d and weight.shape[1] == 1:
        weight = channels_last(weight)
    if (
        use_optimised()
        and x.device.type == "cpu"
        and fmt is torch.channels_last_3d
        and x.dtype == weight.dtype
        and onednn_convolution_ok(x.dtype)
    ):
        weight = weight.contiguous(memory_format=torch.channels_last_3d) if weight.shape[1] > 1 else weight
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, _triple(padding), _triple(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, _triple(stride), _triple(padding))


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1x1 convolution; optimised on channels-last input as a matrix product over channels."""
    if use_optimised() and suggested_format(x) is torch.channels_last_3d:
        out = F.linear(x.permute(0, 2, 3, 4, 1), weight.flatten(1), bias)  # (B, D, H, W, C_out)
        return out.permute(0, 4, 1, 2, 3)
    return F.conv3d(x, weight, bias)


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


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Nearest x2 upsampling then a 3x3x3 convolution, tensors in one dtype (autocast off).

    ``padding=1``: the whole volume, (B, C, n, n, n) -> (B, C_out, 2n, 2n, 2n), zero padding as a
    padded conv on the upsampled grid. ``padding=0``: ``x`` is a coarse tile already carrying one
    voxel of context (or zeros) on each side, covering coarse [a, b); the result covers fine voxels
    [2a + 2, 2b - 2). Optimised: sub-pixel form; reference: interpolate then conv.
    """
    if padding not in (0, 1):
        raise ValueError(f"upsample_conv: padding must be 0 or 1, got {padding}")
    if use_optimised():
        from medvae.models.autograd import interleave_phases

        y8 = conv3d(x, subpixel_weight(weight).to(x.dtype), None if bias is None else bias.repeat(8), 1, padding)
        return interleave_phases(y8, suggested_format(x))
    if padding:
        x = F.pad(x, [1] * 6)
    y = F.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias)  # fine [2a+1, 2b-1)
    return y[:, :, 1:-1, 1:-1, 1:-1]


# -------------------------------------------------------------------------------------- GroupNorm


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, channel) mean and centred sum of squares of (B, C, D, H, W) ``x``, no autograd.

    Returns (mean (B, C) in float32, float64 for float64 input; m2 (B, C) float64). Reference: two
    passes, a sum, then the squared deviations from that mean, in depth slabs (one slab-sized
    temporary). Optimised on CUDA for float32/float64: ``torch.var_mean`` (one-pass Welford).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, c = x.shape[:2]
    voxels = x[0, 0].numel()
    if use_optimised() and x.device.type == "cuda" and x.dtype == dtype:  # one-pass Welford, no temporary
        var, mean = torch.var_mean(x, dim=(2, 3, 4), correction=0)
        return mean, var.double() * voxels
    mean = x.sum(dim=(2, 3, 4), dtype=dtype) / voxels
    pieces = slabs(x)
    work = torch.empty((b, c, pieces[0].stop, *x.shape[3:]), dtype=dtype, device=x.device, memory_format=suggested_format(x))
    m2 = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    centre = mean.view(b, c, 1, 1, 1)
    for depth in pieces:
        tmp = work[:, :, : depth.stop - depth.start]
        torch.sub(x[:, :, depth], centre, out=tmp)
        m2 += tmp.square_().sum(dim=(2, 3, 4)).double()
    return mean, m2


def merge_groups(mean: torch.Tensor, m2: torch.Tensor, voxels: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, m2) over ``voxels`` each -> per-group (mean, m2, count), float64 (Chan)."""
    b = mean.shape[0]
    mean = mean.double().view(b, groups, -1)
    m2 = m2.double().view(b, groups, -1)
    group_mean = mean.mean(-1)
    group_m2 = m2.sum(-1) + voxels * (mean - group_mean[..., None]).square().sum(-1)
    return group_mean, group_m2, voxels * mean.shape[-1]


def rstd_of(m2: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """1 / sqrt(population variance + eps) from a centred sum of squares over ``count`` values."""
    return torch.rsqrt(m2 / count + eps)


def statistics_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_statistics(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) per (batch, group), each (B, groups) float32 (float64 for float64 ``x``).

    Without autograd: ``channel_moments`` merged in float64. With autograd on ``x``: the same
    centred formula from differentiable ops (per-channel mean and variance, merged in float64).
    """
    dtype = statistics_dtype(x)
    voxels = x[0, 0].numel()
    if torch.is_grad_enabled() and x.requires_grad:
        xf = x.to(dtype)
        channel_mean = xf.mean(dim=(2, 3, 4))
        channel_m2 = (xf - channel_mean[..., None, None, None]).square().sum(dim=(2, 3, 4))
    else:
        channel_mean, channel_m2 = channel_moments(x)
    mean, m2, count = merge_groups(channel_mean, channel_m2, voxels, groups)
    return mean.to(dtype), rstd_of(m2, count, eps).to(dtype)


def per_channel(stat: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, groups) -> (B, C), each group's value repeated for its channels."""
    return stat.repeat_interleave(channels // stat.shape[1], dim=1)


def normalize(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm's output from (B, groups) statistics: (x - mean) * rstd * weight + bias, in x's dtype
    and layout. float32/float64: one fused multiply-add per voxel. Half precision: computed in
    float32, centred first, depth slab by depth slab (no full-size float32 temporary). Differentiable
    with respect to everything (the depth slabs are used only without autograd)."""
    b, c = x.shape[:2]
    dtype = statistics_dtype(x)
    scale = per_channel(rstd.to(dtype), c)
    if weight is not None:
        scale = scale * weight.to(dtype)
    mean_c = per_channel(mean.to(dtype), c)
    shape = (b, c, 1, 1, 1)
    if x.dtype in (torch.float32, torch.float64):
        shift = -mean_c * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        if out is None:
            return torch.addcmul(shift.view(shape), x, scale.view(shape))
        return torch.addcmul(shift.view(shape), x, scale.view(shape), out=out)
    bias_c = torch.zeros_like(scale) if bias is None else bias.to(dtype).expand(b, c)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return ((x.to(dtype) - mean_c.view(shape)) * scale.view(shape) + bias_c.reshape(shape)).to(x.dtype)
    if out is None:
        out = torch.empty_like(x, memory_format=suggested_format(x))
    for depth in slabs(x):
        piece = x[:, :, depth].to(dtype).sub_(mean_c.view(shape))
        out[:, :, depth] = piece.mul_(scale.view(shape)).add_(bias_c.reshape(shape))
    return out


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype GroupNorm's backward computes in: float32 for half precision (fp16 squares can
    overflow; bf16 sums lose digits), else x's dtype."""
    return statistics_dtype(x) if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
