"""The recipe peers use, for side-by-side comparisons: MONAI's AutoencoderKL trained with a plain loop.

L1 + kl_weight * KL (the KL as in MONAI's tutorials, summed over the latent and averaged over the
batch, computed in whatever dtype autocast gives), Adam, no clipping, no annealing, no guard.
Used by benchmarks/torture.py and by tests/test_train_torture.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def monai_autoencoder(channels=(32, 64, 64), norm_num_groups=32, latent_channels=3):
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(channels), num_res_blocks=1,
        latent_channels=latent_channels, norm_num_groups=norm_num_groups,
        attention_levels=(False,) * len(channels), with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )


@dataclass
class NaiveRun:
    losses: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    steps_applied: int = 0
    first_nonfinite_step: int | None = None
    weights_finite: bool = True


def naive_monai_run(volumes: torch.Tensor, *, steps: int, lr: float, kl_weight: float, precision: str,
                    grad_scaler: bool = False, seed: int = 0, channels=(32, 64, 64), norm_num_groups=32,
                    device: str = "cpu") -> NaiveRun:
    """Train AutoencoderKL on ``volumes`` (N, 1, D, H, W), cycling through them; record what happens.

    precision: "fp32", "bf16" or "fp16" (CPU autocast). With ``grad_scaler`` the usual AMP recipe
    (torch.amp.GradScaler) is used; otherwise plain autocast.
    """
    torch.manual_seed(seed)
    model = monai_autoencoder(channels, norm_num_groups).to(device)
    volumes = volumes.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device) if grad_scaler and precision == "fp16" else None
    run = NaiveRun()
    for step in range(steps):
        x = volumes[step % len(volumes)][None]
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            recon, z_mu, z_sigma = model(x)
            rec = (recon - x).abs().mean()
            kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3, 4])
            kl = kl.sum() / kl.shape[0]
            loss = rec + kl_weight * kl
        run.losses.append(float(loss.detach()))
        run.kls.append(float(kl.detach()))
        if not math.isfinite(run.losses[-1]) and run.first_nonfinite_step is None:
            run.first_nonfinite_step = step
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            run.steps_applied += int(scaler.get_scale() >= scale_before)
        else:
            loss.backward()
            optimizer.step()
            run.steps_applied += 1
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            run.weights_finite = False
            if run.first_nonfinite_step is None:
                run.first_nonfinite_step = step
    return run
