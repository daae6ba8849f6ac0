"""Memory-bounded, exact encode and decode of whole volumes (CT/MRI too large for one pass).

    from medvae.inference import encode_volume, decode_volume, pad_to_multiple
    padded, crop = pad_to_multiple(x, model.downsampling_factor)
    posterior = encode_volume(model, padded, memory_budget=4 * 2**30)   # bytes
    recon = decode_volume(model, posterior.mode(), memory_budget=4 * 2**30)[crop]
"""

from medvae.inference.padding import pad_to_multiple
from medvae.inference.planner import Plan, estimate_one_pass_bytes, minimum_bytes
from medvae.inference.volume import (
    decode_volume,
    encode_latent,
    encode_volume,
    model_geometry,
    plan_decode,
    plan_encode,
)

__all__ = [
    "Plan",
    "decode_volume",
    "encode_latent",
    "encode_volume",
    "estimate_one_pass_bytes",
    "minimum_bytes",
    "model_geometry",
    "pad_to_multiple",
    "plan_decode",
    "plan_encode",
]
