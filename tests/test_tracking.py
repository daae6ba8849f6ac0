"""Tracking: a real wandb offline run read back from its .wandb file, the local JSON lines files,
disabled mode, non-main processes, and the tri-planar preview PNG."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvae.config import TrackingConfig
from medvae.tracking import Tracker, triplanar_preview
from medvae.tracking.preview import (
    MIN_PANEL_PX,
    PANEL_PX,
    bar_box,
    panel_box,
    preview_size,
    reconstruction_preview,
    reconstruction_preview_size,
)
from medvae.train.guard import GuardEvent
from wandb_offline import alerts, history_keys, history_rows, read_records, run_files


def spike_event(step):
    return GuardEvent(step=step, kind="kl_spike", values={"kl": float("inf"), "median": 2.0}, action="lower_lr",
                      batch_ids=["sub-01_T1w.nii.gz"])


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One offline run (2 steps, an event, an image), then a resumed one (1 step, an event)."""
    root = tmp_path_factory.mktemp("tracking")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(root / name.lower()))
        cfg = TrackingConfig(wandb_mode="offline", project="medvae-test", run_name="unit")
        tracker = Tracker(run_dir, cfg, {"loss": {"kl_weight": 1e-6}}, is_main_process=True)
        tracker.log({"loss": 0.5, "beta": 0.0, "kl_per_channel": torch.tensor([0.1, 0.2, 0.3])}, step=1)
        tracker.log({"loss": 0.4, "beta": 1e-7, "kl_per_channel": torch.tensor([0.1, 0.2, 0.3])}, step=2)
        tracker.event(spike_event(2))
        volume = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32)
        png = reconstruction_preview(volume, volume * 0.5, run_dir / "preview.png", step=2)
        tracker.image("val/preview", png, step=2)
        tracker.finish()

        resumed = Tracker(run_dir, cfg, {}, is_main_process=True, resume=True)
        resumed.log({"loss": 0.3}, step=3)
        resumed.event(spike_event(3))
        resumed.finish()
    return run_dir


def test_offline_run_file_holds_logged_keys_and_alerts(offline_run):
    files = run_files(offline_run)
    assert len(files) == 2  # the first run and the resumed one
    records = read_records(files[0])
    keys = history_keys(records)
    assert {"loss", "beta", "kl_per_channel/0", "kl_per_channel/2", "step"} <= keys
    (image,) = [row for row in history_rows(records) if "val/preview/_type" in row]
    assert json.loads(image["val/preview/_type"]) == "image-file"
    assert (json.loads(image["val/preview/width"]), json.loads(image["val/preview/height"])) == reconstruction_preview_size()
    assert list(files[0].parent.rglob("files/media/images/val/preview_*.png"))
    assert {"guard/kl_spike", "guard/events_total"} <= keys
    (title, text), = alerts(records)
    assert title == "medvae guard: kl_spike at step 2"
    assert text == spike_event(2).message
    losses = [json.loads(row["loss"]) for row in history_rows(records) if "loss" in row]
    assert losses == [0.5, 0.4]


def test_resume_continues_the_run_id_and_appends_local_files(offline_run):
    first, second = run_files(offline_run)
    run_id = (offline_run / "wandb_run_id.txt").read_text().strip()
    assert first.name == second.name == f"run-{run_id}.wandb"
    resumed = read_records(second)
    assert "loss" in history_keys(resumed)
    assert alerts(resumed)[0][0] == "medvae guard: kl_spike at step 3"
    totals = [json.loads(r["guard/events_total"]) for r in history_rows(resumed) if "guard/events_total" in r]
    assert totals == [2]  # counted on from the events already in events.jsonl

    metrics = read_jsonl(offline_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["kl_per_channel/1"] == pytest.approx(0.2)
    events = read_jsonl(offline_run / "events.jsonl")
    assert [(e["step"], e["kind"], e["action"]) for e in events] == [(2, "kl_spike", "lower_lr"), (3, "kl_spike", "lower_lr")]
    assert events[0]["values"]["kl"] == "inf"  # strict JSON for non-finite values
    assert events[0]["batch_ids"] == ["sub-01_T1w.nii.gz"]


def test_disabled_mode_writes_local_files_only(tmp_path, caplog):
    tracker = Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), {}, is_main_process=True)
    tracker.log({"loss": float("nan")}, step=0)
    with caplog.at_level(logging.WARNING, logger="medvae.tracking"):
        tracker.event(spike_event(0))
    tracker.image("val/preview", tmp_path / "missing.png", step=0)  # no wandb: nothing to send
    tracker.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "metrics.jsonl"]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": "nan"}]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "kl_spike" in warning.getMessage() and "\n" not in warning.getMessage()


def test_a_fresh_run_starts_new_local_files(tmp_path):
    cfg = TrackingConfig(wandb_mode="disabled")
    Tracker(tmp_path, cfg, {}, True).log({"loss": 1.0}, step=5)
    Tracker(tmp_path, cfg, {}, True).log({"loss": 2.0}, step=0)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 2.0}]


def test_other_processes_write_nothing(tmp_path):
    tracker = Tracker(tmp_path / "run", TrackingConfig(wandb_mode="offline"), {}, is_main_process=False)
    tracker.log({"loss": 1.0}, step=0)
    tracker.event(spike_event(0))
    tracker.finish()
    assert not (tmp_path / "run").exists()


def test_online_mode_without_credentials_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        Tracker(tmp_path / "run", TrackingConfig(wandb_mode="online"), {}, is_main_process=True)


def test_triplanar_preview_size_and_content(tmp_path):
    shape = (20, 24, 16)  # (D, H, W)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    phantom = (np.sqrt((grid**2).sum(0)) < 0.7).astype(np.float32) * 100.0  # a bright ball, 0 outside
    blurred = phantom * 0.8 + 5.0
    path = triplanar_preview([phantom, blurred], ["input", "reconstruction"], tmp_path / "sub" / "preview.png", scale=2)
    assert path == tmp_path / "sub" / "preview.png"
    assert [p.name for p in path.parent.iterdir()] == ["preview.png"]  # no temporary left behind
    image = Image.open(path)
    assert image.size == preview_size(shape, rows=2, scale=2)
    assert image.size == (4 + 2 * (40 + 4) + (48 + 4), 4 + 2 * (14 + 48 + 4))
    pixels = np.asarray(image)
    assert pixels.std() > 10 and pixels.max() == 255 and pixels.min() == 0
    # the ball's centre is bright in the axial panel of the input row
    top = 4 + 14
    assert pixels[top + 24, 4 + 20] == 255


def test_reconstruction_preview_has_three_planes_by_input_reconstruction_difference(tmp_path):
    shape, spacing = (20, 24, 16), (1.0, 1.0, 2.0)  # (D, H, W), mm
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    background = np.random.default_rng(0).uniform(20.0, 60.0, shape)
    image = np.where(radius < 0.6, 100.0, background).astype(np.float32)
    # wrong only inside the ball: by 20 in its core, by 40 in its shell (the difference window's top)
    reconstruction = np.where(radius < 0.3, 80.0, np.where(radius < 0.6, 60.0, background)).astype(np.float32)
    path = reconstruction_preview(image, reconstruction, tmp_path / "p.png", step=123, spacing=spacing)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape[1::-1] == reconstruction_preview_size() and PANEL_PX >= MIN_PANEL_PX
    for row in range(3):  # axial, coronal, sagittal
        centres = []
        for column in range(3):  # input, reconstruction, |difference|
            left, top, right, bottom = panel_box(row, column)
            assert right - left >= 192 and bottom - top >= 192
            centres.append(pixels[(top + bottom) // 2, (left + right) // 2])
        (ri, gi, bi), (rr, gr, br), (rd, gd, bd) = centres
        assert ri == gi == bi == 255 and rr == gr == br and 150 < rr < 230  # grey: bright input, darker recon
        assert rd == 255 and 100 < gd < 160 and bd == 0  # half-way up the hot colour map: orange
        left, top, right, bottom = panel_box(row, 2)
        assert pixels[top + 40, (left + right) // 2].sum() == 0  # black outside the ball: no difference
    # voxels at their physical aspect: the coronal plane is W x D = 32 mm x 20 mm, so 256 x 160 pixels
    left, top, right, bottom = panel_box(1, 0)
    lit = pixels[top:bottom, left:right].sum(axis=2) > 0
    assert lit.any(axis=0).sum() == 160 and lit.any(axis=1).sum() == 256
    for index in range(2):  # colour bars: intensity (grey) and difference (hot), high at the top
        left, top, right, bottom = bar_box(index)
        assert pixels[top, left].tolist() == [255, 255, 255] and pixels[bottom - 1, left].tolist() == [0, 0, 0]
    middle = pixels[(bar_box(1)[1] + bar_box(1)[3]) // 2, bar_box(1)[0]]
    assert middle[0] > middle[2]  # the difference bar is in colour
    assert pixels[: panel_box(0, 0)[1] - 16].max() == 255  # the title (step) is written


def test_triplanar_preview_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="one label per volume"):
        triplanar_preview([np.zeros((4, 4, 4))], ["a", "b"], tmp_path / "p.png")
    with pytest.raises(ValueError, match="one shape"):
        triplanar_preview([np.zeros((4, 4, 4)), np.zeros((4, 4, 5))], ["a", "b"], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
