"""The divergence guard: after every optimizer step, decide whether the step was healthy.

It looks at the loss, the KL, the gradient norm, the fp16 grad scaler and the KL per latent channel,
and returns structured ``GuardEvent`` records saying what it saw and which action the loop should
take. It never touches the model or the optimizer: the training loop carries out the action.

Kinds and their actions (from ``GuardConfig``):
    nonfinite_loss, nonfinite_kl, nonfinite_grad   on_nonfinite
    kl_spike, grad_spike                           on_spike  (value > median * spike_factor)
    scaler_skip                                    "record"; on_scaler_skips when more than
                                                   scaler_skip_fraction of the last window steps were skipped
    posterior_collapse                             "record"  (a channel's KL < collapse_kl for collapse_steps)

A non-finite gradient norm on a step the fp16 grad scaler skipped is the scaler doing its job: it is
reported as ``scaler_skip``, not ``nonfinite_grad``.

Running statistics are the median and the median absolute deviation (MAD) of the last ``window``
good steps; values from a step with a non-finite or spike event are kept out of them, so one
explosion does not raise the bar for the next. Steps whose events all have action "record" are good.

Abort: when more than ``max_events`` steps with an acted-on event (action other than "record") fall
within the last ``event_window`` steps, or when an event's action is "abort", ``check`` raises
``DivergenceError``; its ``events`` attribute holds this step's events (action "abort") for the log.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from medvae.config import GuardConfig

# Most severe last: the loop takes the most severe action of a step's events.
ACTIONS = ("record", "skip", "lower_lr", "rollback", "abort")
STATE_VERSION = 1


class DivergenceError(RuntimeError):
    """Training diverged beyond what the guard may repair; the message is one line."""

    def __init__(self, message: str, events: list["GuardEvent"] | None = None):
        super().__init__(message)
        self.events = list(events or [])


@dataclass
class GuardEvent:
    """One thing the guard saw at one step, and what the loop should do about it."""

    step: int
    kind: str  # nonfinite_loss, nonfinite_kl, nonfinite_grad, kl_spike, grad_spike, scaler_skip, posterior_collapse
    values: dict  # the numbers behind the decision (plain floats, ints and lists)
    action: str  # record, skip, lower_lr, rollback or abort
    batch_ids: list[str] = field(default_factory=list)  # files of the batch at this step

    @property
    def message(self) -> str:
        """One line for the console and for the wandb alert."""
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        ids = ", ".join(self.batch_ids[:3]) + (f" (+{len(self.batch_ids) - 3} more)" if len(self.batch_ids) > 3 else "")
        return f"step {self.step}: {self.kind} ({shown}) -> {self.action}" + (f"; batch: {ids}" if ids else "")

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "kind": self.kind,
            "values": dict(self.values),
            "action": self.action,
            "batch_ids": list(self.batch_ids),
            "message": self.message,
        }


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def most_severe_action(events: list[GuardEvent]) -> str | None:
    """The action the loop should take for one step's events (None when there are none)."""
    if not events:
        return None
    return max((e.action for e in events), key=ACTIONS.index)


class _RunningStatistic:
    """Median and MAD of the last ``window`` good values."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)

    def median_and_mad(self) -> tuple[float, float]:
        median = statistics.median(self.values)
        return median, statistics.median(abs(v - median) for v in self.values)


class DivergenceGuard:
    """Call ``check`` once per optimizer step, after the step; act on the returned events.

    Args:
        cfg: thresholds and actions.
        kl_collapse_channels: latent channels; when given, ``kl_per_channel`` must have this length.
    """

    def __init__(self, cfg: GuardConfig, kl_collapse_channels: int | None = None):
        self.cfg = cfg
        self.kl_collapse_channels = kl_collapse_channels
        self._kl = _RunningStatistic(cfg.window)
        self._grad = _RunningStatistic(cfg.window)
        self._acted_steps: deque[int] = deque()  # steps with an event whose action is not "record"
        self._scaler_skip_steps: deque[int] = deque()
        self._collapse_counts: list[int] = [0] * (kl_collapse_channels or 0)  # consecutive low-KL steps

    def check(
        self,
        *,
        step: int,
        loss: float,
        kl: float,
        grad_norm: float | None,
        kl_per_channel: list[float] | None,
        step_skipped_by_scaler: bool,
        batch_ids: list[str],
    ) -> list[GuardEvent]:
        """Judge one optimizer step.

        Args:
            step: optimizer step.
            loss: total loss (float).
            kl: KL per latent element, nats (``parts["kl_per_element"]``); same units as
                ``collapse_kl`` and ``kl_spike_floor``.
            grad_norm: global gradient norm before clipping; None when not computed this step.
            kl_per_channel: mean KL per element of each latent channel, or None.
            step_skipped_by_scaler: ``accelerator.optimizer_step_was_skipped``.
            batch_ids: ids (file names) of the batch's volumes.
        Returns the events of this step (empty when all is well). Raises DivergenceError to abort.
        """
        if not self.cfg.enabled:
            return []
        cfg, ids = self.cfg, list(batch_ids)
        events: list[GuardEvent] = []

        def add(kind: str, values: dict, action: str) -> None:
            events.append(GuardEvent(step=step, kind=kind, values=values, action=action, batch_ids=ids))

        loss, kl = float(loss), float(kl)
        grad = None if grad_norm is None else float(grad_norm)
        if not math.isfinite(loss):
            add("nonfinite_loss", {"loss": loss}, cfg.on_nonfinite)
        if not math.isfinite(kl):
            add("nonfinite_kl", {"kl": kl}, cfg.on_nonfinite)
        if grad is not None and not math.isfinite(grad) and not step_skipped_by_scaler:
            add("nonfinite_grad", {"grad_norm": grad}, cfg.on_nonfinite)

        if math.isfinite(kl):
            self._judge_spike("kl_spike", "kl", kl, self._kl, cfg.kl_spike_floor, add)
        if grad is not None and math.isfinite(grad) and not step_skipped_by_scaler:
            self._judge_spike("grad_spike", "grad_norm", grad, self._grad, cfg.grad_spike_floor, add)

        if step_skipped_by_scaler:
            self._judge_scaler_skip(step, grad, add)
        if kl_per_channel is not None:
            self._judge_collapse(step, [float(v) for v in kl_per_channel], add)

        healthy = all(e.action == "record" for e in events)
        if healthy:
            if math.isfinite(kl):
                self._kl.values.append(kl)
            if grad is not None and math.isfinite(grad) and not step_skipped_by_scaler:
                self._grad.values.append(grad)
        else:
            self._acted_steps.append(step)
        self._raise_if_aborting(step, events)
        return events

    # -- the individual judgements -------------------------------------------------------------

    def _judge_spike(self, kind, name, value, history: _RunningStatistic, floor, add) -> None:
        if len(history.values) < self.cfg.min_history:
            return
        median, mad = history.median_and_mad()
        threshold = max(median, floor) * self.cfg.spike_factor
        if value > threshold:
            add(kind, {name: value, "median": median, "mad": mad, "threshold": threshold}, self.cfg.on_spike)

    def _judge_scaler_skip(self, step: int, grad: float | None, add) -> None:
        cfg = self.cfg
        skips = self._scaler_skip_steps
        skips.append(step)
        while skips and skips[0] <= step - cfg.window:
            skips.popleft()
        values = {"skips_in_window": len(skips), "window": cfg.window}
        if grad is not None:
            values["grad_norm"] = grad
        if len(skips) > cfg.scaler_skip_fraction * cfg.window:
            skips.clear()  # judge the next window afresh instead of firing on every step
            add("scaler_skip", values, cfg.on_scaler_skips)
        else:
            add("scaler_skip", values, "record")

    def _judge_collapse(self, step: int, kl_per_channel: list[float], add) -> None:
        expected = self.kl_collapse_channels
        if expected is not None and len(kl_per_channel) != expected:
            raise ValueError(f"DivergenceGuard: kl_per_channel has {len(kl_per_channel)} values, expected {expected}")
        if len(self._collapse_counts) != len(kl_per_channel):
            self._collapse_counts = [0] * len(kl_per_channel)
        newly_collapsed = []
        for channel, value in enumerate(kl_per_channel):
            if not math.isfinite(value):
                continue  # reported as nonfinite_kl; neither collapsed nor recovered
            self._collapse_counts[channel] = self._collapse_counts[channel] + 1 if value < self.cfg.collapse_kl else 0
            if self._collapse_counts[channel] == self.cfg.collapse_steps:
                newly_collapsed.append(channel)
        if newly_collapsed:
            values = {
                "channels": newly_collapsed,
                "kl_per_channel": [kl_per_channel[c] for c in newly_collapsed],
                "steps": self.cfg.collapse_steps,
            }
            add("posterior_collapse", values, "record")

    def _raise_if_aborting(self, step: int, events: list[GuardEvent]) -> None:
        cfg = self.cfg
        acted = self._acted_steps
        while acted and acted[0] <= step - cfg.event_window:
            acted.popleft()
        if len(acted) > cfg.max_events:
            for event in events:
                event.action = "abort"
            raise DivergenceError(
                f"divergence guard: {len(acted)} steps with events in the last {cfg.event_window} steps "
                f"(train.guard.max_events={cfg.max_events}); last: {events[-1].message}",
                events,
            )
        aborting = [e for e in events if e.action == "abort"]
        if aborting:
            raise DivergenceError(f"divergence guard: {aborting[0].message}", events)

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python types only (lists, ints, floats), for a checkpoint's JSON or torch.save."""
        return {
            "version": STATE_VERSION,
            "kl_history": list(self._kl.values),
            "grad_history": list(self._grad.values),
            "acted_steps": list(self._acted_steps),
            "scaler_skip_steps": list(self._scaler_skip_steps),
            "collapse_counts": list(self._collapse_counts),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"DivergenceGuard: state version {state.get('version')!r}, expected {STATE_VERSION}")
        self._kl.values = deque((float(v) for v in state["kl_history"]), maxlen=self.cfg.window)
        self._grad.values = deque((float(v) for v in state["grad_history"]), maxlen=self.cfg.window)
        self._acted_steps = deque(int(s) for s in state["acted_steps"])
        self._scaler_skip_steps = deque(int(s) for s in state["scaler_skip_steps"])
        self._collapse_counts = [int(c) for c in state["collapse_counts"]]
