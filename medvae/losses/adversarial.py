"""Adversarial terms for a patch discriminator, in float32: hinge or least-squares (LSGAN).

Logits are (B, 1, d, h, w) patch scores; every term is a mean over patches and batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("hinge", "lsgan")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"adversarial loss kind must be one of {', '.join(KINDS)}, got {kind!r}")


def generator_adversarial_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The decoder's term: hinge -mean(D(fake)); lsgan mean((D(fake) - 1)^2). Scalar float32."""
    _check(kind)
    with torch.autocast(device_type=fake_logits.device.type, enabled=False):
        fake = fake_logits.float()
        return -fake.mean() if kind == "hinge" else (fake - 1.0).square().mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's term, scalar float32.

    hinge: 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)));
    lsgan: 0.5 * (mean (D(real) - 1)^2 + mean D(fake)^2). Pass fake logits of detached reconstructions.
    """
    _check(kind)
    with torch.autocast(device_type=real_logits.device.type, enabled=False):
        real, fake = real_logits.float(), fake_logits.float()
        if kind == "hinge":
            return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())
