"""``medvae train-prior``: the latent diffusion prior as a task of medvae's training runner.

    medvae train-prior --model runs/x [configs/prior.yaml] [key=value ...]
    accelerate launch [options] -m medvae train-prior --model runs/x [CONFIG] [key=value ...]

The runner (``medvae.train.loop.run_training``) brings what the VAE has: warm-up/cosine LR,
clipping, EMA, the divergence guard with events.jsonl and wandb alerts, atomic checkpoints with
exact resume, and multi-process training. This task brings the data (the VAE's training volumes,
encoded once into a latent cache by the main process), MONAI's DiffusionModelUNet, the diffusion
loss, and the export: the prior folder ``<run>/export`` that ``generate --prior diffusion`` reads.

Validation (every ``train.val_every`` steps) gives the diffusion loss on the held-out latents and
runs the copy probe: ``diffusion.copy_probe`` samples of the model being trained, judged by
generate's copy check against the training latents. A flagged sample is a ``copy_risk`` event
(events.jsonl, a wandb alert; recorded, no action): the prior has begun to reproduce patients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medvae.prior.config import PriorConfig
from medvae.prior.diffusion import (
    ConditionSpec,
    build_scheduler,
    build_unet,
    save_diffusion_prior,
    scheduler_arguments,
    training_loss,
    unet_arguments,
)
from medvae.prior.latents import LatentSet, encode_items, latent_grid_line, load_latents, save_latents
from medvae.train.task import TrainingTask

MODALITIES = ["CT", "MR"]  # the one-hot vocabulary of the modality condition (fixed: the context size must not depend on data)
TRAIN_CACHE = "latents_train.safetensors"
VAL_CACHE = "latents_val.safetensors"
BEST_WEIGHTS, BEST_RECORD = "best_val.safetensors", "best_val.json"  # diffusion.export_weights=lowest_val_loss
COPY_PROBE_SEED = 7_000_000  # the copy probe's samples use fixed seeds: comparable from one validation to the next


def default_output_dir(model_dir: str) -> str:
    """``<model>/prior``: next to the VAE's export inside its run folder."""
    return str(Path(model_dir) / "prior")


def prior_datalists(config: PriorConfig, vae_config: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(train items, held-out items): ``latents.train``/``latents.val``, else the VAE's own split."""
    from omegaconf import OmegaConf

    from medvae.config import DataConfig
    from medvae.data import read_datalist, resolve_datalists

    trained_with = (vae_config.get("extra") or {}).get("trained_with") or {}
    if config.latents.train is not None:
        modality = (vae_config.get("preprocessing") or {}).get("modality") or "MR"
        train = read_datalist(config.latents.train, modality)["training"]
        val = read_datalist(config.latents.val, modality)["training"] if config.latents.val else []
        return train, val
    if not trained_with.get("data"):
        raise ValueError(f"{config.model}: the model does not record its training data; set latents.train=DATALIST")
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), trained_with["data"]))
    return resolve_datalists(data, seed=int((trained_with.get("train") or {}).get("seed", 0)))


class LatentDataset(torch.utils.data.Dataset):
    """Items ``{"latent": (C, d, h, w) scaled, "context": (1, E) if conditional, "id": str}``."""

    def __init__(self, latents: LatentSet, shift: torch.Tensor, scale: torch.Tensor, spec: ConditionSpec):
        self.scaled = (latents.latents - shift[None, :, None, None, None]) * scale[None, :, None, None, None]
        self.ids = latents.ids
        self.contexts = [spec.vector(c, where=f"volume {i}")[None] if spec.keys else None
                         for i, c in zip(latents.ids, latents.conditions)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        item = {"latent": self.scaled[index], "id": self.ids[index]}
        if self.contexts[index] is not None:
            item["context"] = self.contexts[index]
        return item


class DiffusionPriorTask(TrainingTask):
    """Train a MONAI DiffusionModelUNet on the VAE's cached latents (``PriorConfig``)."""

    name = "diffusion_prior"
    primary_term = "diffusion"

    def __init__(self, config: PriorConfig):
        from medvae.jobs.loading import load_for_inference

        self.config = config
        self.batch_size = config.latents.batch_size
        self.num_workers = config.latents.num_workers
        self.vae = load_for_inference(config.model, device="cpu")
        self.spec = ConditionSpec(list(config.diffusion.conditions), MODALITIES)
        self.scheduler_args = scheduler_arguments(config.diffusion)
        self.unet_args = unet_arguments(config.diffusion, int(self.vae.config["model"]["latent_channels"]),
                                        self.spec.size)
        self.train_latents: LatentSet | None = None
        self.val_latents: LatentSet | None = None
        self.shift, self.scale = torch.zeros(0), torch.ones(0)
        self.inferer = None
        self.copy_settings: dict[str, Any] | None = None  # the copy check's threshold, once the latents are in
        self.items = prior_datalists(config, self.vae.config)  # (training, held-out) datalist items
        if config.diffusion.export_weights == "lowest_val_loss" and not self.items[1]:
            raise ValueError("diffusion.export_weights=lowest_val_loss: needs held-out volumes (latents.val)")

    def build_model(self) -> torch.nn.Module:
        return build_unet(self.unet_args)

    def _encode(self, items: list[dict], path: Path, shape: tuple[int, ...] | None) -> LatentSet:
        """The cache at ``path`` when it holds these items from this VAE, else encode and write it."""
        if path.is_file():
            cached = load_latents(path, model_hash=self.vae.hash)
            if cached.ids == [str(i["id"]) for i in items] and (shape is None or cached.latent_shape == shape):
                return cached
        if shape is None and self.config.latents.shape is not None:
            shape = (int(self.vae.config["model"]["latent_channels"]), *self.config.latents.shape)
        # The UNet halves the grid len(channels) - 1 times: the median grid is padded up to a multiple.
        latents = encode_items(self.vae, items, shape, multiple=2 ** (len(self.config.diffusion.channels) - 1))
        save_latents(latents, path)
        return latents

    def build_data(self, run_dir: Path):
        """Encode (main process, once; cached in the run folder) and load the latents on every rank."""
        from accelerate import PartialState

        from medvae.prior.sampling import copy_check_settings

        state = PartialState()
        train_items, val_items = self.items
        if state.is_main_process:
            train = self._encode(train_items, run_dir / TRAIN_CACHE, None)
            if val_items:
                self._encode(val_items, run_dir / VAL_CACHE, train.latent_shape)
        state.wait_for_everyone()
        self.train_latents = load_latents(run_dir / TRAIN_CACHE, model_hash=self.vae.hash)
        self.val_latents = load_latents(run_dir / VAL_CACHE, model_hash=self.vae.hash) if val_items else None
        if state.is_main_process:
            print(latent_grid_line(self.train_latents), flush=True)
        self.shift, self.scale = self.train_latents.scaling(per_channel=self.config.latents.scaling == "channel")
        self.spec.seen = sorted({str(c["modality"]) for c in self.train_latents.conditions})
        self.inferer = _inferer(self.scheduler_args)
        try:
            self.copy_settings = copy_check_settings(self.train_latents.latents, self._heldout_latents())
        except ValueError:  # one training volume and no held-out ones: no threshold, no probe
            self.copy_settings = None
        train_set = LatentDataset(self.train_latents, self.shift, self.scale, self.spec)
        val_set = (LatentDataset(self.val_latents, self.shift, self.scale, self.spec)
                   if self.val_latents is not None else None)
        return train_set, val_set

    def loss(self, model, batch: dict, step: int, generator: torch.Generator):
        """Diffusion MSE (noise target for ddpm, velocity for rflow), float32; one term, "diffusion"."""
        device = generator.device
        latents = batch["latent"].to(device).float()
        context = batch["context"].to(device).float() if "context" in batch else None
        d = self.config.diffusion
        loss = training_loss(model, self.inferer, latents, context, d.scheduler, d.num_train_timesteps,
                             d.condition_dropout, generator, d.timestep_sampling)
        return loss, {"terms": {"diffusion": loss.detach()}}

    def validate(self, model, val_set, accelerator, run_dir: Path, step: int, tracker) -> dict[str, float]:
        """The diffusion loss on the held-out latents with fixed noise (comparable across steps), and
        the copy probe (``diffusion.copy_probe``)."""
        d = self.config.diffusion
        scores: dict[str, float] = {}
        model.eval()
        with torch.no_grad():
            if val_set is not None and len(val_set):
                generator = torch.Generator(device=accelerator.device).manual_seed(12345)
                losses = []
                for index in range(len(val_set)):
                    item = val_set[index]
                    context = item["context"][None].to(accelerator.device) if "context" in item else None
                    losses.append(float(training_loss(model, self.inferer,
                                                      item["latent"][None].to(accelerator.device), context,
                                                      d.scheduler, d.num_train_timesteps, 0.0, generator,
                                                      d.timestep_sampling)))
                scores["val/diffusion_loss"] = sum(losses) / len(losses)
                if d.export_weights == "lowest_val_loss" and accelerator.is_main_process:
                    self._keep_if_best(model, run_dir, step, scores["val/diffusion_loss"])
            scores.update(self._copy_probe(model, accelerator.device, step, tracker))
        model.train()
        return scores

    def _copy_probe(self, model, device, step: int, tracker) -> dict[str, float]:
        """Sample ``copy_probe`` latents from ``model`` and judge them as generate's copy check does."""
        from medvae.prior.diffusion import DiffusionPrior
        from medvae.prior.quality import copy_check, nearest_distances
        from medvae.train.guard import GuardEvent

        d, train = self.config.diffusion, self.train_latents
        settings = self.copy_settings
        if d.copy_probe == 0 or settings is None:
            return {}
        prior = DiffusionPrior(model, self._description(settings))
        samples = []
        for index in range(d.copy_probe):  # conditions of the training volumes in turn
            conditions = {k: train.conditions[index % len(train.ids)][k] for k in self.spec.keys}
            samples.append(prior.sample(1, COPY_PROBE_SEED + index, steps=d.copy_probe_steps,
                                        conditions=conditions or None, device=device)[0])
        distances = nearest_distances(torch.stack(samples), train.latents)
        threshold = float(settings["threshold"])
        flagged = sum(copy_check(distances, threshold)["flagged"])  # generate's verdict, on the probe's samples
        if flagged:
            tracker.event(GuardEvent(step=step, kind="copy_risk", action="record", values={
                "flagged": flagged, "probed": d.copy_probe, "nearest": float(distances.min()), "threshold": threshold}))
        return {"val/copy_flagged_fraction": flagged / d.copy_probe,
                "val/copy_nearest_distance": float(distances.min()), "val/copy_threshold": threshold}

    @staticmethod
    def _keep_if_best(model, run_dir: Path, step: int, loss: float) -> None:
        """Write the weights to the run folder when their held-out loss is the lowest so far (atomic)."""
        from safetensors.torch import save_file

        from medvae.atomic import atomic_file

        record = run_dir / BEST_RECORD
        if record.is_file() and json.loads(record.read_text())["val_diffusion_loss"] <= loss:
            return
        state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
        with atomic_file(run_dir / BEST_WEIGHTS) as tmp:
            save_file(state, str(tmp))
        with atomic_file(record) as tmp:  # after the weights: a record never names weights not yet written
            tmp.write_text(json.dumps({"step": int(step), "val_diffusion_loss": float(loss)}) + "\n")

    def _heldout_latents(self) -> torch.Tensor | None:
        val = self.val_latents
        return val.latents if val is not None and len(val.ids) else None

    def _description(self, copy_check: dict[str, Any] | None) -> dict[str, Any]:
        """The prior's config.json (what ``DiffusionPrior`` and generate read)."""
        train = self.train_latents
        d = self.config.diffusion
        return {
            "unet": self.unet_args, "scheduler": self.scheduler_args,
            "default_sampler": d.sampler or ("rflow" if d.scheduler == "rflow" else "ddim"),
            "sampling_steps": d.sampling_steps, "guidance": d.guidance,
            "latent_shape": list(train.latent_shape), "shift": self.shift.tolist(), "scale": self.scale.tolist(),
            "scaling": f"prior space = (z - shift[channel]) * scale[channel]; scale = 1 / std of the centred latents "
                       f"({'each channel' if self.config.latents.scaling == 'channel' else 'all channels'})",
            "conditions": self.spec.to_dict(),
            "model_hash": self.vae.hash, "preprocessing": self.vae.preprocessing,
            "latents": {k: v for k, v in train.provenance.items() if k not in ("preprocessing",)},
            "num_train_volumes": len(train.ids), "train_ids": train.ids,
            "copy_check": copy_check,
            "trained_with": _plain(self.config),
        }

    def export(self, model, run_dir: Path) -> None:
        """``run_dir/export``: the prior folder (weights, copy reference, config.json with provenance)."""
        from medvae.prior.sampling import copy_check_settings

        config = self._description(copy_check_settings(self.train_latents.latents, self._heldout_latents()))
        if self.config.diffusion.export_weights == "lowest_val_loss":
            from safetensors.torch import load_file

            best = json.loads((run_dir / BEST_RECORD).read_text())
            model = build_unet(self.unet_args)
            model.load_state_dict(load_file(run_dir / BEST_WEIGHTS))
            config["exported_weights"] = {"kind": "lowest_val_loss", **best}
            print(f"medvae: the prior folder gets the weights of step {best['step']} "
                  f"(lowest held-out diffusion loss, {best['val_diffusion_loss']:.4g})", flush=True)
        save_diffusion_prior(run_dir / "export", model, config, self.train_latents.latents)


def _inferer(scheduler_args: dict):
    from monai.inferers import DiffusionInferer

    return DiffusionInferer(build_scheduler(scheduler_args))


def _plain(config: PriorConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def load_prior_config(config_path: str | None, overrides: list[str], model_dir: str) -> PriorConfig:
    """PriorConfig from defaults, the YAML file, the overrides and ``--model`` (train.output_dir defaults to <model>/prior)."""
    from medvae.config import ConfigError, load_config

    config = load_config(config_path, [*overrides, f"model={model_dir}"], schema=PriorConfig)
    if config.diffusion.export_weights == "lowest_val_loss" and not config.train.val_every:
        raise ConfigError("diffusion.export_weights=lowest_val_loss: needs train.val_every > 0")
    if not config.train.output_dir:
        config.train.output_dir = default_output_dir(model_dir)
    return config


def train_prior(config: PriorConfig, hooks=None):
    """Train the prior as ``config`` says; returns the runner's TrainResult."""
    from medvae.train.loop import run_training

    return run_training(DiffusionPriorTask(config), config.train, config.tracking, _plain(config), hooks=hooks)


def train_prior_from_cli(model_dir: str, config_path: str | None, overrides: list[str]) -> None:
    """Entry point of ``medvae train-prior``."""
    import sys

    from accelerate import PartialState

    from medvae.train.guard import DivergenceError

    config = load_prior_config(config_path, overrides, model_dir)
    try:
        result = train_prior(config)
    except DivergenceError as err:
        print(f"medvae train-prior: aborted: {err}", file=sys.stderr)
        sys.exit(3)
    if PartialState().is_main_process:
        print(f"medvae: prior run folder {result.run_dir}")
        print(f"medvae: diffusion prior  {result.run_dir / 'export'} (use: medvae generate --model {model_dir} "
              f"--prior diffusion)")
        print(f"medvae: events log       {result.run_dir / 'events.jsonl'}")
        warning = copy_probe_warning(result.run_dir / "metrics.jsonl")
        if warning:
            print(warning)
        print(json.dumps({"step": result.step}))


def copy_probe_warning(metrics_file: Path) -> str | None:
    """One line when the run's last copy probe flagged samples (metrics.jsonl), else None."""
    if not metrics_file.is_file():
        return None
    probes = [row for row in map(json.loads, metrics_file.read_text().splitlines()) if "val/copy_flagged_fraction" in row]
    flagged = [row["step"] for row in probes if row["val/copy_flagged_fraction"] > 0]
    if not probes or probes[-1]["val/copy_flagged_fraction"] == 0:
        return None
    return (f"medvae: warning: the prior reproduces training volumes: at step {probes[-1]['step']}, "
            f"{probes[-1]['val/copy_flagged_fraction']:.0%} of the copy probe's samples were near-copies "
            f"(first flagged at step {flagged[0]}); train fewer steps or on more volumes before sharing samples")
