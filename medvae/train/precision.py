"""Mixed precision that means what the config says, on GPU and on CPU.

On CUDA, Accelerate's own autocast and GradScaler are used. On CPU, Accelerate 1.x silently runs
``mixed_precision="fp16"`` in float32 (no autocast, no scaler), so a CPU "fp16" run would test
nothing. Here CPU fp16 gets ``torch.autocast("cpu", float16)`` and ``torch.amp.GradScaler("cpu")``,
driven the same way Accelerate drives its scaler on GPU.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator


def accelerate_mixed_precision(requested: str, cpu: bool) -> str:
    """What to hand Accelerate: everything but CPU fp16, which medvae runs itself."""
    return "no" if (requested == "fp16" and cpu) else requested


class Precision:
    """Autocast, loss scaling, unscaling and stepping for one run."""

    def __init__(self, accelerator: Accelerator, requested: str):
        self.accelerator = accelerator
        self.requested = requested
        self.cpu_fp16 = requested == "fp16" and accelerator.device.type == "cpu"
        self.own_scaler = torch.amp.GradScaler("cpu") if self.cpu_fp16 else None
        self._last_step_skipped = False

    @property
    def scaler(self):
        return self.own_scaler if self.own_scaler is not None else self.accelerator.scaler

    def autocast(self):
        if self.cpu_fp16:
            return torch.autocast("cpu", dtype=torch.float16)
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        if self.own_scaler is not None:
            loss = self.own_scaler.scale(loss)
        self.accelerator.backward(loss)

    def unscale_(self, optimizer) -> None:
        """Unscale this optimizer's gradients only (Accelerate's clip_grad_norm_ would do all)."""
        if self.own_scaler is not None:
            self.own_scaler.unscale_(_inner(optimizer))
        else:
            self.accelerator.unscale_gradients(optimizer=optimizer)

    def step(self, optimizer) -> bool:
        """Step the optimizer through the scaler; True if the step was applied (not skipped)."""
        if self.own_scaler is not None:
            scale = self.own_scaler.get_scale()
            self.own_scaler.step(_inner(optimizer))
            self.own_scaler.update()
            self._last_step_skipped = self.own_scaler.get_scale() < scale
            return not self._last_step_skipped
        optimizer.step()
        return not self.accelerator.optimizer_step_was_skipped

    def will_skip(self, grad_norm: float, loss: float) -> bool:
        """True when the fp16 grad scaler will skip this step: a non-finite gradient norm with a
        finite loss is the scaler's business (it skips and lowers the scale), not divergence."""
        return self.scaler is not None and not math.isfinite(grad_norm) and math.isfinite(loss)

    def close_skipped_step(self) -> None:
        """After unscale_ without a step (the guard skipped it), let the scaler start a new step."""
        if self.scaler is not None:
            self.scaler.update()

    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def state_dict(self) -> dict:
        """JSON-safe state of medvae's own CPU scaler (Accelerate saves its GPU scaler itself)."""
        return {} if self.own_scaler is None else dict(self.own_scaler.state_dict())

    def load_state_dict(self, state: dict) -> None:
        if self.own_scaler is not None and state:
            self.own_scaler.load_state_dict(state)


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)

