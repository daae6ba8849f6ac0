"""Tracking: wandb (online, offline, disabled) plus local metrics.jsonl/events.jsonl, and previews."""

from medvae.tracking.preview import triplanar_preview
from medvae.tracking.tracker import Tracker

__all__ = ["Tracker", "triplanar_preview"]

