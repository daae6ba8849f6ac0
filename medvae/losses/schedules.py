"""The KL weight beta as a function of the optimizer step: constant, linear, sigmoid, cyclical.

All schedules are set in optimizer steps and end at ``cfg.kl_weight``. Annealing beta from 0 lets the
decoder learn to use the latent before the KL pulls the posterior onto the prior (Bowman et al. 2016);
the cyclical schedule repeats the ramp every ``kl_cycle_steps`` (Fu et al. 2019).
"""

from __future__ import annotations

import math

from medvae.config import LossConfig


def _sigmoid_ramp(fraction: float, steepness: float) -> float:
    """A logistic ramp rescaled to be exactly 0 at fraction 0, 1/2 at 1/2 and 1 at fraction 1."""
    low = 1.0 / (1.0 + math.exp(steepness / 2))
    high = 1.0 / (1.0 + math.exp(-steepness / 2))
    value = 1.0 / (1.0 + math.exp(-steepness * (fraction - 0.5)))
    return (value - low) / (high - low)


def kl_weight_at(step: int, cfg: LossConfig) -> float:
    """beta at optimizer ``step`` (0-based) for ``cfg.kl_schedule``.

    - constant: ``kl_weight`` from step 0.
    - linear: 0 at step 0, rising linearly to ``kl_weight`` at ``kl_warmup_steps``, then flat.
    - sigmoid: a logistic ramp over ``kl_warmup_steps`` (0 at the start, half-way at the middle,
      ``kl_weight`` at the end), steepness ``kl_sigmoid_steepness``, then flat.
    - cyclical: the linear ramp restarted every ``kl_cycle_steps``: 0 at each cycle start,
      ``kl_weight`` from ``kl_warmup_steps`` into the cycle until the cycle ends.
    """
    if step < 0:
        raise ValueError(f"kl_weight_at: step must be >= 0, got {step}")
    schedule, weight, warmup = cfg.kl_schedule, cfg.kl_weight, cfg.kl_warmup_steps
    if schedule == "constant" or (warmup <= 0 and schedule != "cyclical"):
        return float(weight)
    if schedule == "linear":
        return float(weight * min(1.0, step / warmup))
    if schedule == "sigmoid":
        return float(weight * _sigmoid_ramp(min(1.0, step / warmup), cfg.kl_sigmoid_steepness))
    if schedule == "cyclical":
        position = step % cfg.kl_cycle_steps
        return float(weight if warmup <= 0 else weight * min(1.0, position / warmup))
    raise ValueError(f"loss.kl_schedule: unknown schedule {schedule!r}")
