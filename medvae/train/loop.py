"""The training runner: one readable loop under Accelerate, for any ``TrainingTask``.

Per optimizer step, top to bottom: set the LR; forward and backward through the prepared model
under autocast; unscale and clip; the divergence guard judges the step; one call carries out its
verdict (step, skip, lower the LR, roll back or abort); EMA; log; validate; checkpoint.

The VAE: ``train(config)``, run with ``medvae train CONFIG [key=value ...]`` or
``accelerate launch [accelerate options] -m medvae train CONFIG [key=value ...]``.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
from torch.utils.data import DataLoader

from medvae.atomic import atomic_file
from medvae.config import Config, TrackingConfig, TrainConfig, to_dict
from medvae.train.checkpoint import TRAINER_STATE, CheckpointError, load_checkpoint, save_checkpoint
from medvae.train.run_folder import CONFIG_NAME, RunFolderPlan, apply_run_folder, plan_run_folder
from medvae.train.guard import DivergenceError, DivergenceGuard, GuardEvent, most_severe_action
from medvae.train.ordering import EpochOrderedDataset
from medvae.train.precision import Precision, accelerate_mixed_precision
from medvae.train.task import TrainingTask


def _unchanged(step: int, value):
    return value


@dataclass
class TrainHooks:
    """Fault injection for tests (chaos testing), called at fixed points of every optimizer step.

    The defaults change nothing; a hook may ask ``accelerate.PartialState().process_index`` to
    strike one rank only.
    """

    on_batch: Callable[[int, dict], dict] = _unchanged  # (step, batch) -> the batch to train on
    on_lr: Callable[[int, float], float] = _unchanged  # (step, lr) -> the LR to use for this step


@dataclass
class TrainResult:
    run_dir: Path  # checkpoints/, export/, events.jsonl, metrics.jsonl, previews/
    step: int  # optimizer steps done
    model: torch.nn.Module  # this rank's trained model (EMA weights when enabled)
    seen_ids: list[str]  # ids of the volumes this rank trained on, in order


def train(config: Config) -> TrainResult:
    """Train a VAE3D as ``config`` says; return the run folder and this rank's model."""
    from medvae.train.vae_task import VAETask

    return run_training(VAETask(config), config.train, config.tracking, to_dict(config))


def run_training(task: TrainingTask, train: TrainConfig, tracking: TrackingConfig, config_dict: dict, *,
                 hooks: TrainHooks | None = None) -> TrainResult:
    """Train ``task``'s model with ``train``'s recipe; log with ``tracking``; store ``config_dict``."""
    hooks = hooks or TrainHooks()
    accelerator = _accelerator(train)
    precision = Precision(accelerator, train.mixed_precision)
    run_dir = Path(train.output_dir).resolve()
    # Every rank plans, reading only: refuse a folder that is not this run's, pick the newest valid
    # checkpoint. Only then does the main process set old files aside and write config.yaml.
    plan = plan_run_folder(run_dir, train.resume, train.overwrite)
    resume_from = plan.resume_from  # a checkpoint folder, or None
    signature = task.model_signature(config_dict)
    if resume_from is not None:
        _check_same_model(task, resume_from, signature)
    _write_run_config(accelerator, plan, config_dict)

    set_seed(train.seed)  # the same initial weights on every rank ...
    model = task.build_model()
    set_seed(train.seed, device_specific=True)  # ... and different noise per rank
    train_set, val_set = task.build_data(run_dir)
    ordered, loader = _ordered_loader(train_set, task, train.seed, accelerator.num_processes)
    optimizer = torch.optim.AdamW(_param_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    task.setup(accelerator, precision)
    unwrapped = accelerator.unwrap_model(model)
    ema = _ema(unwrapped, train.ema_decay)
    guard = DivergenceGuard(train.guard)
    state = {"step": 0, "micro_batches": 0}
    if resume_from is not None:
        state = _resume(accelerator, resume_from, guard, precision, ema)
    tracker = _tracker(run_dir, tracking, config_dict, accelerator, resume_from is not None)
    samples_per_step = (task.batch_size * getattr(task, "samples_per_item", 1) * accelerator.num_processes
                        * train.gradient_accumulation_steps)
    tracker.log({"train/effective_batch_size": samples_per_step, "train/num_processes": accelerator.num_processes},
                step=state["step"])

    update = _Update(optimizer, precision, unwrapped, ema)
    noise = torch.Generator(device=accelerator.device)
    progress = _progress(train.max_steps, state["step"], accelerator)
    meter = _Meter(accelerator)
    seen_ids: list[str] = []
    for micro_batches in _optimizer_steps(loader, ordered, accelerator, state, train):
        step = state["step"]
        lr = hooks.on_lr(step, learning_rate_at(step, train) * guard.lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for batch in micro_batches:  # gradient accumulation: DDP syncs on the last one only
            batch = hooks.on_batch(step, batch)
            with accelerator.accumulate(model):
                # Posterior noise seeded by (seed, rank, micro-batch): reproducible on resume.
                noise.manual_seed(train.seed * 1_000_003 + accelerator.process_index * 10_007 + state["micro_batches"])
                with precision.autocast():
                    loss, parts = task.loss(model, batch, step, noise)
                # A non-finite loss would poison the all-reduced gradients: back-propagate zero instead.
                precision.backward(loss if torch.isfinite(loss) else loss.nan_to_num(0.0) * 0.0)
            state["micro_batches"] += 1
            seen_ids.extend(batch.get("id", []))
            meter.count(batch)

        # Unscale (fp16) and clip this optimizer's gradients only, not the discriminator's.
        precision.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip))
        judged = _mean_over_ranks(accelerator, loss, parts)  # every rank judges the same numbers
        events = guard.check(step=step, grad_norm=grad_norm, primary_term=task.primary_term,
                             step_skipped_by_scaler=precision.will_skip(grad_norm, judged["loss"]), **judged)
        _report(events, batch, tracker)  # events.jsonl, wandb metrics + alert, console; raises on abort
        applied = update.carry_out(most_severe_action(events), snapshot=step % train.guard.snapshot_every == 0)
        task.after_optimizer_step(model, batch, applied, step)

        state["step"] = step + 1
        progress.update(1)
        done = state["step"] >= train.max_steps
        if state["step"] % tracking.log_every == 0 or done:
            metrics = meter.metrics(parts, judged, lr=lr, grad_norm=grad_norm, lr_scale=guard.lr_scale,
                                    applied=applied, loss_scale=precision.loss_scale())
            tracker.log(metrics, step=state["step"])
            progress.set_postfix(loss=f"{judged['loss']:.4f}", lr=f"{lr:.2e}")
        if train.val_every and (state["step"] % train.val_every == 0 or done):
            scores = task.validate(ema.module if ema is not None else unwrapped, val_set, accelerator, run_dir,
                                   state["step"], tracker)
            tracker.log(scores, step=state["step"])
            accelerator.wait_for_everyone()
        if state["step"] % train.checkpoint_every == 0 or done:
            trainer_state = {**state, "guard": guard.state_dict(), "cpu_grad_scaler": precision.state_dict(),
                             "model_signature": signature}
            if ema is not None:  # the EMA's update count too: after resume it must average, not copy
                trainer_state["ema_n_averaged"] = int(ema.n_averaged)
            extra = {"ema.safetensors": ema.module.state_dict()} if ema is not None else None
            save_checkpoint(accelerator, run_dir, state["step"], trainer_state, extra, keep=train.keep_checkpoints)
        if done:
            break

    progress.close()
    final_model = ema.module if ema is not None else unwrapped
    if accelerator.is_main_process:
        task.export(final_model, run_dir)
        with atomic_file(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps({"task": task.name, "step": state["step"], "run_dir": str(run_dir)}, indent=1))
    accelerator.wait_for_everyone()
    tracker.finish()
    accelerator.end_training()
    return TrainResult(run_dir, state["step"], final_model, seen_ids)


def learning_rate_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up to ``train.lr``, then cosine decay to ``lr * min_lr_ratio`` at max_steps."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * progress))


class _Snapshot:
    """An in-memory copy of the last good model/optimizer state, for the guard's rollback."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.take(model, optimizer)

    def take(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict())

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)


class _Update:
    """Carries out the guard's verdict on one optimizer step: the single place that steps."""

    def __init__(self, optimizer, precision: Precision, model: torch.nn.Module, ema):
        self.optimizer, self.precision, self.model, self.ema = optimizer, precision, model, ema
        self.snapshot = _Snapshot(model, optimizer)

    def carry_out(self, action: str, snapshot: bool = False) -> bool:
        """"record": step (and update EMA); "skip"/"lower_lr": drop the gradients (the guard has
        lowered its LR scale); "rollback": also restore the last snapshot. True if the step was applied.

        ``snapshot``: on a "record" step, first copy the weights this step was judged on. They gave
        a healthy loss and gradient; the weights after the update have not been judged yet (a bad
        update shows only in the next step's forward), so they are never what a rollback restores.
        """
        if action == "record":
            if snapshot:
                self.snapshot.take(self.model, self.optimizer)
            applied = self.precision.step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            if applied and self.ema is not None:
                self.ema.update_parameters(self.model)
            return applied
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.close_skipped_step()  # the scaler saw unscale_ but no step
        if action == "rollback":
            self.snapshot.restore(self.model, self.optimizer)
            if self.ema is not None:
                self.ema.module.load_state_dict(self.model.state_dict())
        return False


def _accelerator(train: TrainConfig) -> Accelerator:
    use_cpu = train.cpu or not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=accelerate_mixed_precision(train.mixed_precision, use_cpu),
        # Sync every n micro-batches, across epoch ends too: one optimizer step per group of n.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=train.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        cpu=use_cpu,  # without CUDA, cpu=True gives real gloo ranks under `accelerate launch --multi_gpu`
    )


def _write_run_config(accelerator: Accelerator, plan: RunFolderPlan, config_dict: dict) -> None:
    """Prepare the planned run folder and store the run's configuration in it (main process)."""
    from omegaconf import OmegaConf

    # Every rank must have planned (reading only) before the folder changes: a rank that planned after
    # config.yaml appeared would see another run's folder and refuse it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_run_folder(plan, OmegaConf.to_yaml(OmegaConf.create(config_dict)))
    accelerator.wait_for_everyone()


def _ordered_loader(train_set, task: TrainingTask, seed: int,
                    num_processes: int) -> tuple[EpochOrderedDataset, DataLoader]:
    """A loader whose order follows from (seed, epoch) alone; its generator keeps the per-epoch seed
    draw off the global RNG (exact resume)."""
    from monai.data import list_data_collate

    # A dataset with fewer volumes than one global batch lists each volume several times per epoch.
    ordered = EpochOrderedDataset(train_set, seed=seed, min_length=task.batch_size * num_processes)
    loader = DataLoader(ordered, batch_size=task.batch_size, shuffle=False, drop_last=True,
                        num_workers=getattr(task, "num_workers", 0), collate_fn=list_data_collate,
                        generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise ValueError(f"{task.name}: {len(train_set)} training item(s) is fewer than the batch size {task.batch_size}")
    return ordered, loader


def _optimizer_steps(loader, ordered: EpochOrderedDataset, accelerator: Accelerator, state: dict, train: TrainConfig):
    """Lists of ``gradient_accumulation_steps`` micro-batches, one per optimizer step, until
    max_steps. Epoch and position follow from the micro-batches consumed (exact resume)."""
    group = []
    while state["step"] < train.max_steps:
        epoch, skip = divmod(state["micro_batches"] + len(group), len(loader))
        ordered.use_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            group.append(batch)
            if len(group) == train.gradient_accumulation_steps:
                yield group
                group = []
                if state["step"] >= train.max_steps:
                    return


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on convolution and linear weights only, never on norms and biases."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ema(model: torch.nn.Module, decay: float | None):
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _check_same_model(task: TrainingTask, checkpoint: Path, signature: dict) -> None:
    """Refuse to resume weights into a different function: the checkpoint's model signature (or, for
    checkpoints written before signatures were stored, its run folder's config.yaml) must equal the
    current config's."""
    from omegaconf import OmegaConf

    recorded = json.loads((checkpoint / TRAINER_STATE).read_text()).get("model_signature")
    recorded_config = checkpoint.parent.parent / CONFIG_NAME
    if recorded is None and recorded_config.is_file():
        try:
            recorded = task.model_signature(OmegaConf.to_container(OmegaConf.load(recorded_config)))
        except Exception as err:  # a damaged or foreign config.yaml: say which file, in one line
            raise CheckpointError(f"{recorded_config}: cannot tell which model {checkpoint.name} was trained "
                                  f"with ({' '.join(str(err).split())})") from None
    if recorded is None:
        return
    changed = [f"model.{k}={recorded.get(k)!r} there, {signature.get(k)!r} now"
               for k in sorted(set(recorded) | set(signature)) if recorded.get(k) != signature.get(k)]
    if changed:
        raise CheckpointError(f"{checkpoint}: trained with a different model ({'; '.join(changed)}); "
                              "set those back to resume, or start a new run")


def _resume(accelerator: Accelerator, checkpoint: Path, guard: DivergenceGuard, precision: Precision, ema) -> dict:
    """Restore every prepared object, the guard, the CPU grad scaler and EMA; return the step counters."""
    state = load_checkpoint(accelerator, checkpoint)
    guard.load_state_dict(state["guard"])
    precision.load_state_dict(state.get("cpu_grad_scaler", {}))
    if ema is not None and (checkpoint / "ema.safetensors").is_file():
        from safetensors.torch import load_file

        ema.module.load_state_dict(load_file(str(checkpoint / "ema.safetensors")))
        ema.n_averaged.fill_(int(state.get("ema_n_averaged", 0)))
    accelerator.print(f"medvae: resumed from {checkpoint} at step {state['step']}")
    return {"step": state["step"], "micro_batches": state["micro_batches"]}


def _tracker(run_dir: Path, tracking: TrackingConfig, config_dict: dict, accelerator: Accelerator, resume: bool):
    from medvae.tracking import Tracker

    return Tracker(run_dir, tracking, config_dict, accelerator.is_main_process, resume=resume)


def _progress(total: int, initial: int, accelerator: Accelerator):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process, desc="medvae train",
                dynamic_ncols=True)


def _mean_over_ranks(accelerator: Accelerator, loss: torch.Tensor, parts: dict) -> dict:
    """The loss, its weighted terms and the KL per channel (if any), averaged over ranks: plain floats."""
    terms = parts["terms"]
    values = torch.tensor([float(loss.detach()), *(float(v) for v in terms.values())], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean").tolist()
    judged = {"loss": values[0], "terms": dict(zip(terms, values[1:])), "kl_per_channel": None}
    if "kl_per_channel" in parts:
        per_channel = parts["kl_per_channel"].detach().float().to(accelerator.device)
        judged["kl_per_channel"] = accelerator.reduce(per_channel, reduction="mean").tolist()
    return judged


def _report(events: list[GuardEvent], batch: dict, tracker) -> None:
    """Name every rank's batch files in the events, send them to the tracker; raise on abort.

    Every rank reaches this with the same events (the guard judged all-reduced numbers), so the
    collective gather is safe.
    """
    if not events:
        return
    ids = gather_object([str(i) for i in batch.get("id", [])])
    for event in events:
        event.batch_ids = ids
        tracker.event(event)
    aborting = [e for e in events if e.action == "abort"]
    if aborting:
        tracker.finish()
        raise DivergenceError(f"divergence guard: {aborting[0].message}")


class _Meter:
    """Throughput and memory between two log lines, and the metrics row of a step."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.started, self.samples = time.perf_counter(), 0

    def count(self, batch: dict) -> None:
        self.samples += len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))

    def metrics(self, parts: dict, judged: dict, *, lr: float, grad_norm: float, lr_scale: float, applied: bool,
                loss_scale: float | None) -> dict:
        elapsed = time.perf_counter() - self.started
        metrics = {f"train/{k}": v for k, v in parts.items() if isinstance(v, (int, float))}
        metrics.update({f"train/term/{k}": v for k, v in judged["terms"].items()})
        metrics.update({
            "train/lr": lr, "train/grad_norm": grad_norm, "train/lr_scale": lr_scale, "train/step_applied": float(applied),
            "train/samples_per_second": self.samples * self.accelerator.num_processes / max(elapsed, 1e-9),
            "train/peak_memory_mb": _peak_memory_mb(self.accelerator.device),
        })
        if judged["kl_per_channel"] is not None:
            metrics["train/kl_per_channel"] = judged["kl_per_channel"]
        if loss_scale is not None:
            metrics["train/loss_scale"] = loss_scale
        self.started, self.samples = time.perf_counter(), 0
        return metrics


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
