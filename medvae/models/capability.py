"""Which optimised kernels this process may call: one capability check for every direct backend op.

medvae calls ``torch.ops.aten.mkldnn_convolution`` directly on channels-last CPU tensors. That op
refuses bf16 unless the CPU has avx512bw/vl/dq or avx_ne_convert, while ``F.conv3d`` under the same
dtype picks another kernel and works. Every direct call goes through ``onednn_convolution_ok``.

``MEDVAE_REFERENCE_KERNELS=1`` in the environment forces the plain ``torch.nn.functional`` path
everywhere (the CI-visible switch the parity tests and a whole-suite run use).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("medvae.models")


def reference_kernels_forced() -> bool:
    """True when ``MEDVAE_REFERENCE_KERNELS`` is set to 1/true/yes (read at each call)."""
    return os.environ.get("MEDVAE_REFERENCE_KERNELS", "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def _onednn_dtype_supported(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if not supported:
            log.warning("medvae: this CPU has no oneDNN bf16 convolution (needs avx512bw/vl/dq or "
                        "avx_ne_convert); bf16 convolutions use PyTorch's generic kernel, which can be 10x or "
                        "more slower than fp32 here: train in fp32 on this CPU")
        return supported
    return False


def onednn_convolution_ok(dtype: torch.dtype) -> bool:
    """Whether a direct ``aten.mkldnn_convolution`` call in ``dtype`` is supported here (CPU only)."""
    return not reference_kernels_forced() and _onednn_dtype_supported(dtype)
