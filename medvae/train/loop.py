"""The training loop: one readable function under Accelerate.

Per optimizer step, top to bottom: set the LR; maybe validate and checkpoint; forward through the
prepared model under autocast; float32 losses; backward; unscale and clip; let the divergence guard
judge the step (skip, lower the LR, roll back or abort); step; log.

Run with ``medvae train CONFIG [key=value ...]`` or
``accelerate launch [accelerate options] -m medvae train CONFIG [key=value ...]``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from medvae.atomic import atomic_file
from medvae.config import Config, to_dict, to_yaml
from medvae.export import save_model
from medvae.losses import VAELoss
from medvae.losses.adversarial import discriminator_loss
from medvae.models import VAE3D
from medvae.models.discriminator import PatchDiscriminator3D
from medvae.prior import fit_and_save_prior
from medvae.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from medvae.train.guard import DivergenceError, DivergenceGuard, GuardEvent, most_severe_action
from medvae.train.ordering import EpochOrderedDataset
from medvae.train.precision import Precision, accelerate_mixed_precision
from medvae.train.validation import validate

log = logging.getLogger("medvae.train")


def learning_rate_at(step: int, config: Config) -> float:
    """Linear warm-up to ``train.lr``, then cosine decay to ``lr * min_lr_ratio`` at max_steps."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution and linear weights only, never on norms and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _Snapshot:
    """An in-memory copy of the last good model/optimizer state, for the guard's rollback."""

    def __init__(self) -> None:
        self.model: dict | None = None
        self.optimizer: dict | None = None

    def take(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict())

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)


@dataclass
class TrainResult:
    run_dir: Path  # checkpoints/, export/, events.jsonl, metrics.jsonl, previews/
    step: int  # optimizer steps done
    model: VAE3D  # this rank's trained model (EMA weights when enabled)
    seen_ids: list[str]  # ids of the volumes this rank trained on, in order


def train(config: Config) -> TrainResult:
    """Train a VAE3D as ``config`` says; return the run folder and this rank's model."""
    t = config.train
    use_cpu = t.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=accelerate_mixed_precision(t.mixed_precision, use_cpu),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        # Without CUDA, cpu=True gives real gloo ranks under `accelerate launch --multi_gpu`.
        cpu=use_cpu,
    )
    precision = Precision(accelerator, t.mixed_precision)
    run_dir = Path(t.output_dir).resolve()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / "config.yaml") as tmp:
            tmp.write_text(to_yaml(config))
    accelerator.wait_for_everyone()
    # Same weights on every rank at init (DDP also broadcasts them); different noise per rank.
    set_seed(t.seed)
    model = VAE3D(**to_dict(config)["model"])
    set_seed(t.seed, device_specific=True)

    from medvae.data import build_datasets

    train_set, val_set, preprocessing = build_datasets(config, model.downsampling_factor, run_dir=run_dir)
    ordered = EpochOrderedDataset(train_set, seed=t.seed)
    # The loader's own generator keeps its per-epoch seed draw off the global RNG (exact resume).
    loader = DataLoader(ordered, batch_size=config.data.batch_size, shuffle=False, drop_last=True,
                        num_workers=config.data.num_workers, collate_fn=_collate(),
                        generator=torch.Generator().manual_seed(t.seed))
    if len(loader) == 0:
        raise ValueError(
            f"data.train: {len(train_set)} training volume(s) is fewer than data.batch_size={config.data.batch_size}"
        )

    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    discriminator = disc_optimizer = None
    if config.loss.adversarial_weight > 0:
        loss_config = config.loss
        discriminator = PatchDiscriminator3D(
            in_channels=config.model.in_channels, channels=loss_config.discriminator_channels,
            num_layers=loss_config.discriminator_layers, norm=loss_config.discriminator_norm,
            spectral_norm=loss_config.discriminator_spectral_norm,
        )
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=t.lr, betas=(0.5, 0.9))
        model, optimizer, discriminator, disc_optimizer, loader = accelerator.prepare(
            model, optimizer, discriminator, disc_optimizer, loader
        )
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if t.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(unwrapped, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)

    loss_fn = VAELoss(config.loss)
    guard = DivergenceGuard(t.guard, kl_collapse_channels=config.model.latent_channels)
    snapshot = _Snapshot()
    state: dict[str, Any] = {"step": 0, "micro_batches": 0, "lr_scale": 1.0, "guard": guard.state_dict(),
                             "cpu_grad_scaler": precision.state_dict()}

    resume_from = resolve_resume(t.resume, run_dir)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        guard.load_state_dict(state["guard"])
        precision.load_state_dict(state.get("cpu_grad_scaler", {}))
        if ema is not None and (resume_from / "ema.safetensors").is_file():
            from safetensors.torch import load_file

            ema.module.load_state_dict(load_file(str(resume_from / "ema.safetensors")))
        accelerator.print(f"medvae: resumed from {resume_from} at step {state['step']}")

    from medvae.tracking import Tracker

    tracker = Tracker(run_dir, config.tracking, to_dict(config), accelerator.is_main_process,
                      resume=resume_from is not None)
    effective_batch = config.data.batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    tracker.log({"train/effective_batch_size": effective_batch, "train/num_processes": accelerator.num_processes},
                step=state["step"])

    from tqdm.auto import tqdm

    progress = tqdm(total=t.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
                    desc="medvae train", dynamic_ncols=True)
    snapshot.take(unwrapped, optimizer)
    noise = torch.Generator(device=accelerator.device)
    seen_ids: list[str] = []
    step_started = time.perf_counter()
    window_voxels = 0

    while state["step"] < t.max_steps:
        # Deterministic order: epoch and position follow from the micro-batches already consumed.
        epoch, skip = divmod(state["micro_batches"], len(loader))
        ordered.use_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            step = state["step"]
            lr = learning_rate_at(step, config) * state["lr_scale"]
            if t.faults.lr_spike_at_step == step:
                lr *= t.faults.lr_spike_factor
            for group in optimizer.param_groups:
                group["lr"] = lr

            x = _plain_tensor(batch["image"]).to(accelerator.device)
            if t.faults.nan_at_step == step:
                x = torch.full_like(x, float("nan"))
            seen_ids.extend(batch.get("id", []))
            with accelerator.accumulate(model):
                with precision.autocast():
                    # Posterior noise seeded by (seed, rank, micro-batch): reproducible on resume.
                    noise.manual_seed(t.seed * 1_000_003 + accelerator.process_index * 10_007 + state["micro_batches"])
                    output = model(x, generator=noise)
                disc_logits = None
                if discriminator is not None and step >= config.loss.adversarial_start_step:
                    with precision.autocast():
                        disc_logits = discriminator(output.reconstruction)
                loss, parts = loss_fn(output, x, step, discriminator_logits=disc_logits)
                # A non-finite loss would poison the all-reduced gradients: back-propagate zero instead.
                loss_ok = bool(torch.isfinite(loss))
                precision.backward(loss if loss_ok else loss.nan_to_num(0.0) * 0.0)
                state["micro_batches"] += 1
                window_voxels += x.numel()
                if not accelerator.sync_gradients:
                    continue

                # Unscale (fp16) and clip this optimizer's gradients only: Accelerate's
                # clip_grad_norm_ would unscale every prepared optimizer, the discriminator's too.
                precision.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))

                # Every rank judges the same numbers: average loss and KL over ranks first.
                stats = torch.tensor([loss.item() if loss_ok else float("nan"), parts["kl_per_element"]],
                                     device=accelerator.device)
                stats = accelerator.reduce(stats, reduction="mean")
                kl_per_channel = accelerator.reduce(parts["kl_per_channel"].detach().float().to(accelerator.device),
                                                    reduction="mean")
                # Under fp16 an infinite gradient with a finite loss is the grad scaler's business:
                # it skips the step and lowers the scale; the guard records it as scaler_skip.
                scaler_will_skip = (precision.scaler is not None and not math.isfinite(grad_norm)
                                    and math.isfinite(stats[0].item()))
                try:
                    events = guard.check(step=step, loss=stats[0].item(), kl=stats[1].item(), grad_norm=grad_norm,
                                         kl_per_channel=kl_per_channel.tolist(),
                                         step_skipped_by_scaler=scaler_will_skip, batch_ids=[])
                except DivergenceError as err:
                    _record_events(err.events, batch, tracker)
                    tracker.finish()
                    raise
                action = most_severe_action(events) or "record"
                _record_events(events, batch, tracker)

                if action in ("skip", "lower_lr", "rollback"):
                    optimizer.zero_grad(set_to_none=True)
                    precision.close_skipped_step()  # the scaler saw unscale_ but no step
                    if action in ("lower_lr", "rollback"):
                        state["lr_scale"] *= t.guard.lr_factor
                    if action == "rollback":
                        snapshot.restore(unwrapped, optimizer)
                        if ema is not None:
                            ema.module.load_state_dict(unwrapped.state_dict())
                    applied = False
                else:
                    applied = precision.step(optimizer)
                    optimizer.zero_grad(set_to_none=True)
                    if applied and ema is not None:
                        ema.update_parameters(unwrapped)

                if discriminator is not None and step >= config.loss.adversarial_start_step and applied:
                    _discriminator_step(precision, discriminator, disc_optimizer, x, output.reconstruction,
                                        config, t.grad_clip)

            state["step"] = step + 1
            state["guard"] = guard.state_dict()
            state["cpu_grad_scaler"] = precision.state_dict()
            if applied and not events and state["step"] % t.guard.snapshot_every == 0:
                snapshot.take(unwrapped, optimizer)
            progress.update(1)

            if state["step"] % config.tracking.log_every == 0 or state["step"] == t.max_steps:
                elapsed = time.perf_counter() - step_started
                metrics = {f"train/{k}": v for k, v in parts.items() if isinstance(v, (int, float))}
                metrics.update({
                    "train/lr": lr, "train/grad_norm": grad_norm, "train/lr_scale": state["lr_scale"],
                    "train/step_applied": float(applied),
                    "train/voxels_per_second": window_voxels * accelerator.num_processes / max(elapsed, 1e-9),
                    "train/peak_memory_mb": _peak_memory_mb(accelerator.device),
                })
                if precision.scaler is not None:
                    metrics["train/loss_scale"] = precision.loss_scale()
                for c, value in enumerate(kl_per_channel.tolist()):
                    metrics[f"train/kl_channel_{c}"] = value
                tracker.log(metrics, step=state["step"])
                progress.set_postfix(loss=f"{stats[0].item():.4f}", kl=f"{stats[1].item():.1f}")
                step_started, window_voxels = time.perf_counter(), 0

            if t.val_every and (state["step"] % t.val_every == 0 or state["step"] == t.max_steps):
                if len(val_set) >= accelerator.num_processes:
                    scores = validate(ema.module if ema is not None else unwrapped, val_set, accelerator,
                                      run_dir, state["step"], tracker)
                    tracker.log(scores, step=state["step"])
                accelerator.wait_for_everyone()

            if state["step"] % t.checkpoint_every == 0 or state["step"] == t.max_steps:
                extra = {"ema.safetensors": ema.module.state_dict()} if ema is not None else None
                save_checkpoint(accelerator, run_dir, state["step"], state, extra, keep=t.keep_checkpoints)

            if state["step"] >= t.max_steps:
                break

    progress.close()
    if accelerator.is_main_process:
        final_model = ema.module if ema is not None else unwrapped
        save_model(final_model, run_dir / "export", preprocessing=preprocessing,
                   extra={"step": state["step"], "trained_with": to_dict(config)})
        # The prior `generate --prior fitted` samples: fitted to the training volumes' latent means.
        fit_and_save_prior(final_model, train_set.data, config.data, run_dir / "export")
        with atomic_file(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps({"step": state["step"], "run_dir": str(run_dir)}, indent=1))
    accelerator.wait_for_everyone()
    tracker.finish()
    accelerator.end_training()
    return TrainResult(run_dir, state["step"], ema.module if ema is not None else unwrapped, seen_ids)


def _record_events(events: list[GuardEvent], batch: dict, tracker) -> None:
    """Attach the ids of every rank's batch files to the events and send them to the tracker.

    Every rank reaches this with the same events (the guard judged all-reduced numbers), so the
    collective gather is safe.
    """
    if not events:
        return
    ids = gather_object([str(i) for i in batch.get("id", [])])
    for event in events:
        event.batch_ids = ids
        tracker.event(event)


def _discriminator_step(precision: Precision, discriminator, optimizer, real, fake, config: Config,
                        clip: float) -> float:
    """One discriminator update with its own unscale and clip; returns its gradient norm."""
    with precision.autocast():
        real_logits = discriminator(real)
        fake_logits = discriminator(fake.detach())
    d_loss = discriminator_loss(real_logits.float(), fake_logits.float(), config.loss.adversarial_loss)
    precision.backward(d_loss)
    precision.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(discriminator.parameters(), clip))
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _plain_tensor(image) -> torch.Tensor:
    """A MONAI MetaTensor's data as a plain tensor: metadata stays with the data pipeline."""
    return image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)


def _collate():
    from monai.data import list_data_collate

    return list_data_collate
