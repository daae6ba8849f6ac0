"""One logging path for a training run: wandb (online, offline or disabled) plus local JSON lines.

Files in the run folder (main process only; appended to on resume):
    metrics.jsonl   {"step": int, "<name>": float, ...} per ``log`` call
    events.jsonl    one guard event per line: step, kind, values, action, batch_ids, message
    wandb/          wandb's own run files (offline runs sync later with ``wandb sync``)

Non-finite numbers are written as the strings "nan", "inf" and "-inf", so every line is strict JSON.
wandb charts use the logged "step" as their x-axis, so steps repeated after a resume or a rollback
are kept rather than dropped by wandb's own monotonic step counter.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

from medvae.atomic import atomic_file
from medvae.config import TrackingConfig

logger = logging.getLogger("medvae.tracking")

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def _json_value(value: Any) -> Any:
    """Plain JSON for floats, tensors, numpy scalars, lists and dicts; non-finite floats as strings."""
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays or scalars
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars as floats; 1-D tensors or lists become ``name/0``, ``name/1``, ... (e.g. KL per channel)."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                flat[f"{name}/{index}"] = float(item)
        elif isinstance(value, (int, float)):  # bools log as 0.0 / 1.0
            flat[name] = float(value)
        else:
            raise ValueError(f"Tracker.log: metric {name!r} is {type(value).__name__}, not a number or a 1-D list of numbers")
    return flat


def _append_line(path: Path, record: dict, sync: bool) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(_json_value(record)) + "\n")
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def _new_run_id() -> str:
    """An 8-character wandb run id; kept in the run folder so a resumed run continues it."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _has_wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """Log scalars, guard events and preview images of one run.

    Args:
        run_dir: the run folder (created if missing).
        cfg: wandb mode, project and run name.
        config_dict: the run's full configuration, stored with the wandb run.
        is_main_process: only the main process writes anything; elsewhere every method is a no-op.
        resume: append to existing metrics/events files and continue the same wandb run id.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        config_dict: dict,
        is_main_process: bool,
        resume: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.active = is_main_process
        self.run = None
        self.events_total = 0
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.events_path = self.run_dir / EVENTS_FILE
        if not resume:
            for path in (self.metrics_path, self.events_path):
                path.unlink(missing_ok=True)
        elif self.events_path.exists():
            with open(self.events_path, encoding="utf-8") as handle:
                self.events_total = sum(1 for line in handle if line.strip())
        self.events_path.touch()  # present, and empty, when nothing went wrong
        if cfg.wandb_mode != "disabled":
            self.run = self._init_wandb(config_dict, resume)

    def _init_wandb(self, config_dict: dict, resume: bool):
        import wandb

        if self.cfg.wandb_mode == "online" and not _has_wandb_login():
            raise ValueError(
                "tracking.wandb_mode=online needs WANDB_API_KEY in the environment (or `wandb login`); "
                "use tracking.wandb_mode=offline and `wandb sync` later"
            )
        id_path = self.run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.exists() else _new_run_id()
        with atomic_file(id_path) as tmp:
            tmp.write_text(run_id + "\n")
        settings = wandb.Settings(
            silent=True,
            console="off",  # leave stdout alone (progress bar, our own warnings)
            disable_git=True,
            save_code=False,
            x_disable_stats=True,  # no system-metrics sampler thread
            x_disable_machine_info=True,
            init_timeout=120,
        )
        run = wandb.init(
            project=self.cfg.project,
            name=self.cfg.run_name,
            dir=str(self.run_dir),
            mode=self.cfg.wandb_mode,
            config=config_dict,
            id=run_id,
            resume="allow" if resume else None,
            settings=settings,
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars (floats, 0-d tensors; 1-D tensors/lists become name/i) to metrics.jsonl and wandb."""
        if not self.active:
            return
        flat = flatten_metrics(metrics)
        _append_line(self.metrics_path, {"step": int(step), **flat}, sync=False)
        if self.run is not None:
            self.run.log({**flat, "step": int(step)})

    def event(self, event) -> None:
        """A GuardEvent to events.jsonl (fsynced), wandb metrics + a WARN alert, and one console line."""
        if not self.active:
            return
        self.events_total += 1
        _append_line(self.events_path, event.to_dict(), sync=True)
        logger.warning("medvae guard: %s", event.message)
        if self.run is not None:
            import wandb

            self.run.log({f"guard/{event.kind}": 1.0, "guard/events_total": float(self.events_total), "step": event.step})
            self.run.alert(
                title=f"medvae guard: {event.kind} at step {event.step}",
                text=event.message,
                level=wandb.AlertLevel.WARN,
                wait_duration=0,
            )

    def image(self, key: str, png_path: Path, step: int) -> None:
        """A PNG (e.g. the tri-planar preview) to wandb; the file itself stays in the run folder."""
        if not self.active or self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(str(png_path)), "step": int(step)})

    def finish(self) -> None:
        """Close the wandb run; the offline run file is complete on disk when this returns."""
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            # wandb 0.31's finish() returns before the service has flushed an offline run file;
            # shutting the service down waits for it (a later wandb.init starts a new one).
            wandb.teardown()
