"""Training behaviour that mutations used to slip through (issue 11, findings 12-13), checked from
what a run leaves behind: metrics.jsonl, checkpoints (trainer_state.json, optimizer.bin read with
weights_only=True), the export, and the LR schedule's public function.

Each test names the mutation it kills; the runs are tiny CPU runs in fresh processes.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from medvae import load_model
from medvae.config import load_config
from medvae.train.checkpoint import list_checkpoints
from phantoms import write_phantoms
from training_helpers import TINY_TRAINING, read_jsonl, run_medvae_train

LR, WARMUP, MAX_STEPS, MIN_RATIO, WEIGHT_DECAY, ACCUMULATION, CROPS = 2e-3, 2, 5, 0.1, 0.05, 2, 2


def _schedule(step: int) -> float:
    """The documented schedule, written out independently: linear warm-up, cosine to lr * ratio."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (MAX_STEPS - WARMUP))
    return LR * MIN_RATIO + 0.5 * (LR - LR * MIN_RATIO) * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory):
    """5 optimizer steps of 2 micro-batches of 2 volumes x 2 crops each, a checkpoint after every step."""
    base = tmp_path_factory.mktemp("gaps")
    write_phantoms(base / "data", count=6)
    overrides = TINY_TRAINING + [
        f"data.train={base / 'data'}", f"train.output_dir={base / 'run'}", f"train.max_steps={MAX_STEPS}",
        f"train.lr={LR}", f"train.warmup_steps={WARMUP}", f"train.min_lr_ratio={MIN_RATIO}",
        f"train.weight_decay={WEIGHT_DECAY}", f"train.gradient_accumulation_steps={ACCUMULATION}",
        f"data.crops_per_volume={CROPS}", "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.val_every=0",
    ]
    result = run_medvae_train(base, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, overrides


def test_logged_lr_follows_warmup_then_cosine(accumulated_run):
    """Kills: warm-up off by one step, no floor (decay to 0), linear instead of cosine decay."""
    base, _ = accumulated_run
    logged = {row["step"]: row["train/lr"] for row in read_jsonl(base / "run" / "metrics.jsonl") if "train/lr" in row}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for step, lr in logged.items():  # the row of step S holds the LR used by optimizer step S - 1
        assert lr == pytest.approx(_schedule(step - 1), rel=1e-6), (step, lr)


def test_lr_function_at_its_landmarks():
    from medvae.train.loop import learning_rate_at

    train = load_config(None, ["train.lr=1.0", "train.warmup_steps=10", "train.max_steps=110",
                               "train.min_lr_ratio=0.2"]).train
    assert learning_rate_at(0, train) == pytest.approx(0.1)
    assert learning_rate_at(9, train) == pytest.approx(1.0)
    assert learning_rate_at(60, train) == pytest.approx(0.6)  # half-way down the cosine: the mean of 1 and 0.2
    assert learning_rate_at(110, train) == pytest.approx(0.2) and learning_rate_at(500, train) == pytest.approx(0.2)


def test_accumulation_consumes_k_micro_batches_per_step_and_logs_the_effective_batch(accumulated_run):
    """Kills: accumulation ignored (one micro-batch per step), and an effective batch logged without the
    accumulation or without the crops each volume gives."""
    base, _ = accumulated_run
    rows = read_jsonl(base / "run" / "metrics.jsonl")
    assert [r["train/effective_batch_size"] for r in rows if "train/effective_batch_size" in r] == [2 * CROPS * ACCUMULATION]
    for checkpoint in list_checkpoints(base / "run"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["micro_batches"] == state["step"] * ACCUMULATION, state


def test_weight_decay_only_on_conv_and_linear_weights(accumulated_run):
    """Kills: one param group for everything, or the decay/no-decay split inverted."""
    base, _ = accumulated_run
    optimizer = torch.load(list_checkpoints(base / "run")[-1] / "optimizer.bin", weights_only=True)
    groups = optimizer["param_groups"]
    model = load_model(base / "run")
    shapes = [tuple(p.shape) for p in model.parameters()]
    by_decay = {g["weight_decay"]: len(g["params"]) for g in groups}
    assert by_decay == {WEIGHT_DECAY: sum(len(s) >= 2 for s in shapes), 0.0: sum(len(s) < 2 for s in shapes)}
    assert by_decay[0.0] > 0 and by_decay[WEIGHT_DECAY] > 0


def test_resume_auto_takes_the_newest_of_several_checkpoints(accumulated_run, tmp_path):
    """Kills: resume=auto taking the first (oldest) or a lexically sorted checkpoint."""
    base, overrides = accumulated_run
    run = tmp_path / "copy"
    shutil.copytree(base / "run" / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints" / "step_000005")  # newest left: step 4 of 1..4
    resumed = run_medvae_train(tmp_path, [o for o in overrides if not o.startswith("train.output_dir")]
                               + [f"train.output_dir={run}", "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_000004 at step 4" in resumed.stdout + resumed.stderr
    full = {r["step"]: r["train/loss"] for r in read_jsonl(base / "run" / "metrics.jsonl") if "train/loss" in r}
    again = {r["step"]: r["train/loss"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r}
    assert sorted(again) == [5] and again[5] == full[5]


def _kl_reference(mean: torch.Tensor, logvar: torch.Tensor, prior_std: float) -> torch.Tensor:
    """(C,) KL per latent element of N(mean, exp(logvar)) from N(0, prior_std^2), by torch.distributions."""
    posterior = torch.distributions.Normal(mean.double(), torch.exp(0.5 * logvar.double()))
    prior = torch.distributions.Normal(torch.zeros_like(mean, dtype=torch.float64), prior_std)
    return torch.distributions.kl_divergence(posterior, prior).transpose(0, 1).flatten(1).mean(dim=1)


@pytest.mark.parametrize("prior_std, free_bits", [(2.5, 0.0), (1.0, 0.4)])
def test_prior_std_and_free_bits_reach_the_loss_from_the_config(prior_std, free_bits):
    """Kills: VAELoss built with prior_std=1 or free_bits=0 whatever the config says."""
    from medvae.train.vae_task import VAETask

    config = load_config(None, TINY_TRAINING + [f"loss.prior_std={prior_std}", f"loss.free_bits={free_bits}",
                                                "loss.kl_schedule=constant", "loss.kl_weight=1.0"])
    task = VAETask(config)
    torch.manual_seed(0)
    model = task.build_model()
    x = torch.rand(2, 1, 16, 16, 16)
    loss, parts = task.loss(model, {"image": x}, step=0, generator=torch.Generator().manual_seed(1))
    output = model(x, generator=torch.Generator().manual_seed(1))
    per_channel = _kl_reference(output.mean.detach(), output.logvar.detach(), prior_std)
    latent_elements = output.mean[0, 0].numel()
    assert parts["kl"] == pytest.approx(float(per_channel.sum() * latent_elements), rel=1e-4)
    expected = float(per_channel.clamp(min=free_bits).sum() * latent_elements / x[0].numel())
    assert parts["kl_loss"] == pytest.approx(expected, rel=1e-4)
    assert (per_channel < free_bits).any() == (free_bits > 0)  # the floor really binds in the free-bits case


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory):
    """The same 3 steps in fp32 and fp16 (no clipping: grad_clip far above the norms)."""
    base = tmp_path_factory.mktemp("fp16")
    write_phantoms(base / "data", count=3, shape=(16, 16, 16))
    runs = {}
    for precision in ("no", "fp16"):
        overrides = TINY_TRAINING + [f"data.train={base / 'data'}", f"train.output_dir={base / precision}",
                                     "train.max_steps=3", "train.grad_clip=1e9", "train.val_every=0",
                                     "data.val_fraction=0.34", f"train.mixed_precision={precision}",
                                     "train.checkpoint_every=100", "train.guard.enabled=false"]
        result = run_medvae_train(base, overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[precision] = {r["step"]: r for r in read_jsonl(base / precision / "metrics.jsonl") if "train/loss" in r}
    return runs


def test_fp16_logs_unscaled_grad_norms_and_tracks_fp32(precision_runs):
    """Kills: clipping (and measuring) before unscale_, and a no-op unscale: both log norms
    ~65,536x too large (the grad scaler's initial scale) and change the updates."""
    fp32, fp16 = precision_runs["no"], precision_runs["fp16"]
    for step in (1, 2, 3):
        if fp16[step]["train/step_applied"] == 1.0:
            ratio = fp16[step]["train/grad_norm"] / fp32[step]["train/grad_norm"]
            assert 0.5 < ratio < 2.0, (step, ratio)
    assert fp16[1]["train/loss_scale"] > 1000  # the scale that an unscale-less norm would carry
    assert fp16[3]["train/loss"] == pytest.approx(fp32[3]["train/loss"], rel=0.05)
