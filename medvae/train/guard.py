"""The divergence guard: after every optimizer step's backward, decide whether to apply the step.

It judges what can hurt a run, never what merely changes while a model learns:

    kind                 what                                               action (GuardConfig)
    nonfinite_loss       the loss, a loss term or the gradient norm is       on_nonfinite (rollback)
    nonfinite_term       NaN or infinite (a non-finite gradient on a step
    nonfinite_grad       the fp16 grad scaler skips is a scaler_skip)
    grad_spike           pre-clip gradient norm above spike_factor x its     skip; lower_lr when spikes
                         running median (and spike_mads robust deviations)   persist (persist_steps of the
    term_spike           a WEIGHTED loss term likewise, judged only while    last persist_window steps);
                         it is at least min_term_share of the loss           rollback when they come on
                                                                             persist_steps consecutive steps
                                                                             (the weights, not a batch) or
                                                                             persist above explosion_factor
    primary_rise         the primary term's (reconstruction) median over     lower_lr (rollback above
                         the last rise_window steps above rise_factor x      rollback_rise_factor)
                         the best such median seen
    scaler_skip          fp16 steps skipped by the grad scaler               record; on_scaler_skips when
                                                                             more than scaler_skip_fraction
                                                                             of the last window steps
    posterior_collapse   a latent channel's KL under collapse_kl for         record
                         collapse_steps steps
    lr_recovered         recover_steps steps with no acted-on event after    record (LR scale / lr_factor,
                         a back-off                                          at most 1)
    too_many_events      more than max_events acted-on steps within          abort
                         event_window steps

Why log values, medians and MADs: random crops of real anatomy change the gradient norm and the loss
from step to step by factors (a crop of background against a crop of cortex). On a log scale those
factors are additive, and the median and the median absolute deviation (MAD) of the last ``window``
good steps ignore the outliers. A value is a spike only when it is both ``spike_factor`` times the
median and ``spike_mads`` robust deviations (1.4826 x MAD) above it, so a noisy series raises its own
bar. Values from steps with acted-on events are kept out of the statistics, so one explosion does not
raise the bar for the next. Why weighted terms and shares: the raw KL of a low-beta VAE grows by
orders of magnitude while the posterior sharpens, and it is a millionth of the loss; only terms that
carry weight in the loss can hurt the run.

The guard owns the LR scale: lower_lr and rollback multiply it by ``lr_factor``; after
``recover_steps`` steps without an acted-on event it is divided by ``lr_factor`` again (at most 1), so
a back-off is never permanent. It never touches the model or the optimizer: the runner carries out
the action (``medvae.train.loop``). Every rank must call ``check`` with the same numbers (all-reduced).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from medvae.config import GuardConfig

# Most severe last: the runner takes the most severe action of a step's events.
ACTIONS = ("record", "skip", "lower_lr", "rollback", "abort")
STATE_VERSION = 2
MAD_TO_STD = 1.4826  # MAD x this estimates the standard deviation of normally distributed values
TINY = 1e-30  # log(0) guard for terms and gradient norms that are exactly zero


class DivergenceError(RuntimeError):
    """Training diverged beyond what the guard may repair; the message is one line."""


@dataclass
class GuardEvent:
    """One thing the guard saw at one step, and what the runner should do about it."""

    step: int
    kind: str  # see the module docstring
    values: dict  # the numbers behind the decision (plain floats, ints, strings and lists)
    action: str  # record, skip, lower_lr, rollback or abort
    batch_ids: list[str] = field(default_factory=list)  # files of the batch at this step (every rank's)

    @property
    def acted_on(self) -> bool:
        return self.action != "record"

    @property
    def message(self) -> str:
        """One line for the console and for the wandb alert."""
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        ids = ", ".join(self.batch_ids[:3]) + (f" (+{len(self.batch_ids) - 3} more)" if len(self.batch_ids) > 3 else "")
        return f"step {self.step}: {self.kind} ({shown}) -> {self.action}" + (f"; batch: {ids}" if ids else "")

    def to_dict(self) -> dict:
        return {"step": self.step, "kind": self.kind, "values": dict(self.values), "action": self.action,
                "batch_ids": list(self.batch_ids), "message": self.message}


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def most_severe_action(events: list[GuardEvent]) -> str:
    """The action the runner should take for one step's events: "record" when there is nothing to do."""
    return max((e.action for e in events), key=ACTIONS.index, default="record")


class _LogHistory:
    """The last ``window`` good values of one series, as natural logs; robust spike statistics."""

    def __init__(self, window: int):
        self.logs: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self.logs.append(math.log(max(abs(value), TINY)))

    def excess(self, value: float) -> tuple[float, float, float]:
        """(log(value) - median, robust deviation of the logs, median as a value)."""
        median = statistics.median(self.logs)
        mad = statistics.median(abs(v - median) for v in self.logs)
        return math.log(max(abs(value), TINY)) - median, MAD_TO_STD * mad, math.exp(median)


class DivergenceGuard:
    """Call ``check`` once per optimizer step, after backward and before the optimizer step."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.lr_scale = 1.0  # multiplies the scheduled LR; lowered by lower_lr/rollback, recovers
        self._histories: dict[str, _LogHistory] = {}  # "grad_norm", "term/<name>", "primary"
        self._best_primary: float | None = None  # lowest recent median of the primary term (log)
        self._rise_quiet_until = 0  # no rise is judged before this step (after a primary_rise event)
        self._spike_steps: deque[tuple[int, bool]] = deque()  # (step, explosive) of recent spikes
        self._acted_steps: deque[int] = deque()  # steps with an acted-on event
        self._scaler_skip_steps: deque[int] = deque()
        self._collapse_counts: list[int] = []  # consecutive low-KL steps per latent channel
        self._good_streak = 0  # steps since the last acted-on event

    def check(
        self,
        *,
        step: int,
        loss: float,
        terms: dict[str, float],
        primary_term: str | None,
        grad_norm: float | None,
        step_skipped_by_scaler: bool = False,
        kl_per_channel: list[float] | None = None,
    ) -> list[GuardEvent]:
        """Judge one optimizer step; update the LR scale; return the step's events.

        Args:
            step: optimizer step.
            loss: total loss (float).
            terms: each loss term's WEIGHTED value (floats summing to ``loss``).
            primary_term: the key of ``terms`` watched for a sustained rise, or None.
            grad_norm: global gradient norm before clipping; None when not computed this step.
            step_skipped_by_scaler: the fp16 grad scaler will skip this step (non-finite gradients).
            kl_per_channel: mean KL per latent element of each channel (nats), or None.
        Events whose action is "abort" mean the runner must stop (raise DivergenceError).
        """
        if not self.cfg.enabled:
            return []
        events: list[GuardEvent] = []

        def add(kind: str, values: dict, action: str) -> None:
            events.append(GuardEvent(step=step, kind=kind, values=values, action=action))

        loss = float(loss)
        terms = {name: float(value) for name, value in terms.items()}
        grad = None if grad_norm is None or step_skipped_by_scaler else float(grad_norm)
        self._judge_nonfinite(loss, terms, grad, add)
        if step_skipped_by_scaler:
            self._judge_scaler_skip(step, add)
        finite = not events or all(e.kind == "scaler_skip" for e in events)
        spiked = finite and self._judge_spikes(step, loss, terms, primary_term, grad, add)
        if finite and not spiked and primary_term in terms:
            self._judge_primary_rise(step, terms[primary_term], add)
        if kl_per_channel is not None:
            self._judge_collapse([float(v) for v in kl_per_channel], add)

        acted = any(e.acted_on for e in events)
        if not acted and finite:
            for name, value in self._series(terms, primary_term, grad, loss).items():
                self._history(name).add(value)
            if primary_term in terms:
                self._history("primary").add(terms[primary_term])
        self._update_lr_scale(step, events)
        self._judge_abort(step, events, add)
        return events

    # -- the individual judgements -------------------------------------------------------------

    def _history(self, name: str) -> _LogHistory:
        if name not in self._histories:
            self._histories[name] = _LogHistory(self.cfg.window)
        return self._histories[name]

    def _series(self, terms: dict, primary_term: str | None, grad: float | None, loss: float) -> dict[str, float]:
        """The spike-judged values of this step: the gradient norm and the non-primary terms that
        carry at least min_term_share of the loss."""
        series = {} if grad is None else {"grad_norm": grad}
        scale = sum(abs(v) for v in terms.values()) or abs(loss) or 1.0
        for name, value in terms.items():
            if name != primary_term and abs(value) / scale >= self.cfg.min_term_share:
                series[f"term/{name}"] = value
        return series

    def _judge_nonfinite(self, loss: float, terms: dict, grad: float | None, add) -> None:
        action = self.cfg.on_nonfinite
        if not math.isfinite(loss):
            add("nonfinite_loss", {"loss": loss}, action)
        bad_terms = {name: value for name, value in terms.items() if not math.isfinite(value)}
        if bad_terms:
            add("nonfinite_term", bad_terms, action)
        if grad is not None and not math.isfinite(grad):
            add("nonfinite_grad", {"grad_norm": grad}, action)

    def _judge_spikes(self, step: int, loss: float, terms: dict, primary_term: str | None, grad: float | None,
                      add) -> bool:
        """Add spike events; True when something spiked."""
        cfg = self.cfg
        series = self._series(terms, primary_term, grad, loss)
        spiking = []
        for name, value in series.items():
            history = self._history(name)
            if len(history.logs) < cfg.min_history:
                continue
            excess, deviation, median = history.excess(value)
            if excess > math.log(cfg.spike_factor) and excess > cfg.spike_mads * deviation:
                spiking.append((name, value, median, math.exp(excess)))
        if not spiking:
            return False
        explosive = max(factor for *_, factor in spiking) >= cfg.explosion_factor
        spikes = self._spike_steps
        spikes.append((step, explosive))
        while spikes and spikes[0][0] <= step - cfg.persist_window:
            spikes.popleft()
        # Spikes on consecutive steps saw the same weights (skipped steps change nothing): the weights
        # are bad, not a batch. Roll back to weights that were judged healthy.
        last = list(spikes)[-cfg.persist_steps:]
        consecutive = len(last) == cfg.persist_steps and last[-1][0] - last[0][0] == cfg.persist_steps - 1
        if consecutive or sum(e for _, e in spikes) >= cfg.persist_steps:
            action = "rollback"
        elif len(spikes) >= cfg.persist_steps:
            action = "lower_lr"
        else:
            action = "skip"
        for name, value, median, factor in spiking:
            kind = "grad_spike" if name == "grad_norm" else "term_spike"
            values = {"series": name, "value": value, "median": median, "factor": factor,
                      "spikes_in_window": len(spikes)}
            if name != "grad_norm":
                values["share"] = abs(value) / (sum(abs(v) for v in terms.values()) or 1.0)
            add(kind, values, action)
        return True

    def _judge_primary_rise(self, step: int, value: float, add) -> None:
        cfg = self.cfg
        logs = self._history("primary").logs
        if len(logs) < max(cfg.min_history, cfg.rise_window) or step < self._rise_quiet_until:
            return
        recent = list(logs)[-(cfg.rise_window - 1):] + [math.log(max(abs(value), TINY))]
        level = statistics.median(recent)
        if self._best_primary is None or level < self._best_primary:
            self._best_primary = level
            return
        rise = math.exp(level - self._best_primary)
        if rise < cfg.rise_factor:
            return
        action = "rollback" if rise >= cfg.rollback_rise_factor else "lower_lr"
        add("primary_rise", {"recent_median": math.exp(level), "best_median": math.exp(self._best_primary),
                             "factor": rise}, action)
        # Let the action work before judging again: the recent median then holds only later steps.
        self._rise_quiet_until = step + cfg.rise_window

    def _judge_scaler_skip(self, step: int, add) -> None:
        cfg = self.cfg
        skips = self._scaler_skip_steps
        skips.append(step)
        while skips and skips[0] <= step - cfg.window:
            skips.popleft()
        values = {"skips_in_window": len(skips), "window": cfg.window}
        if len(skips) > cfg.scaler_skip_fraction * cfg.window:
            skips.clear()  # judge the next window afresh instead of firing on every step
            add("scaler_skip", values, cfg.on_scaler_skips)
        else:
            add("scaler_skip", values, "record")

    def _judge_collapse(self, kl_per_channel: list[float], add) -> None:
        if len(self._collapse_counts) != len(kl_per_channel):
            self._collapse_counts = [0] * len(kl_per_channel)
        newly_collapsed = []
        for channel, value in enumerate(kl_per_channel):
            if not math.isfinite(value):
                continue  # reported as non-finite; neither collapsed nor recovered
            self._collapse_counts[channel] = self._collapse_counts[channel] + 1 if value < self.cfg.collapse_kl else 0
            if self._collapse_counts[channel] == self.cfg.collapse_steps:
                newly_collapsed.append(channel)
        if newly_collapsed:
            add("posterior_collapse", {"channels": newly_collapsed, "steps": self.cfg.collapse_steps,
                                       "kl_per_channel": [kl_per_channel[c] for c in newly_collapsed]}, "record")

    def _update_lr_scale(self, step: int, events: list[GuardEvent]) -> None:
        cfg = self.cfg
        action = most_severe_action(events)
        if action in ("lower_lr", "rollback"):
            self.lr_scale *= cfg.lr_factor
        if action != "record":
            self._good_streak = 0
            self._acted_steps.append(step)
            return
        self._good_streak += 1
        if self.lr_scale < 1.0 and self._good_streak >= cfg.recover_steps:
            previous, self.lr_scale = self.lr_scale, min(1.0, self.lr_scale / cfg.lr_factor)
            self._good_streak = 0
            events.append(GuardEvent(step=step, kind="lr_recovered", action="record",
                                     values={"lr_scale_before": previous, "lr_scale": self.lr_scale}))

    def _judge_abort(self, step: int, events: list[GuardEvent], add) -> None:
        cfg = self.cfg
        acted = self._acted_steps
        while acted and acted[0] <= step - cfg.event_window:
            acted.popleft()
        if len(acted) > cfg.max_events:
            add("too_many_events", {"acted_steps": len(acted), "event_window": cfg.event_window,
                                    "max_events": cfg.max_events}, "abort")

    # -- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python types only (lists, ints, floats), for a checkpoint's JSON."""
        return {
            "version": STATE_VERSION,
            "lr_scale": self.lr_scale,
            "histories": {name: list(h.logs) for name, h in self._histories.items()},
            "best_primary": self._best_primary,
            "rise_quiet_until": self._rise_quiet_until,
            "spike_steps": [[s, e] for s, e in self._spike_steps],
            "acted_steps": list(self._acted_steps),
            "scaler_skip_steps": list(self._scaler_skip_steps),
            "collapse_counts": list(self._collapse_counts),
            "good_streak": self._good_streak,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"DivergenceGuard: state version {state.get('version')!r}, expected {STATE_VERSION} "
                             "(a checkpoint from an older medvae)")
        self.lr_scale = float(state["lr_scale"])
        self._histories = {}
        for name, logs in state["histories"].items():
            self._history(name).logs.extend(float(v) for v in logs)
        self._best_primary = None if state["best_primary"] is None else float(state["best_primary"])
        self._rise_quiet_until = int(state["rise_quiet_until"])
        self._spike_steps = deque((int(s), bool(e)) for s, e in state["spike_steps"])
        self._acted_steps = deque(int(s) for s in state["acted_steps"])
        self._scaler_skip_steps = deque(int(s) for s in state["scaler_skip_steps"])
        self._collapse_counts = [int(c) for c in state["collapse_counts"]]
        self._good_streak = int(state["good_streak"])
