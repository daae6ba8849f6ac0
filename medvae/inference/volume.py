"""Whole-volume encode and decode under a memory budget, equal to the one-pass result.

``encode_volume`` / ``decode_volume`` run the model directly when its one-pass peak fits the budget;
otherwise they split the network into streamed passes (``medvae.inference.planner``) whose
convolutions see exactly the voxels they would see in one pass and whose GroupNorms use the
statistics of the whole volume. No seams, no per-tile statistics, no blending. With ``spill_dir``,
the plan may keep full-resolution tensors in temporary files there instead of recomputing them
(``medvae.inference.spill``): fewer convolutions under a small budget, at the cost of disk
traffic. The model's parameter-free shortcut (``model.shortcut``) needs only the full input and the full result, so both
paths apply it with the model's own ``posterior`` / ``output`` methods (in place here).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from medvae.inference.planner import Geometry, Plan, plan_volume
from medvae.inference.spill import check_free_space
from medvae.inference.steps import network_steps
from medvae.inference.streaming import run_plan
from medvae.models.posterior import DiagonalGaussian
from medvae.models.vae import VAE3D

# With no budget given, use this share of the memory that is free when the call starts.
DEFAULT_BUDGET_FRACTION = 0.8


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` now: CUDA free + cached, else host MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _memory_format(model: VAE3D) -> torch.memory_format:
    return torch.channels_last_3d if getattr(model.arch, "channels_last", False) else torch.contiguous_format


def model_geometry(model: VAE3D, part: str, shape: tuple[int, ...], device: torch.device | None = None,
                   spill: bool = False) -> Geometry:
    """Steps, tensor shapes and channels of ``model.encoder`` (``part="encoder"``) or ``model.decoder``
    for an input of ``shape`` (B, C, D, H, W); the argument of ``estimate_one_pass_bytes`` and
    ``minimum_bytes``. ``device`` (default: the model's) picks the memory model; ``spill`` lets plans
    keep cut tensors in spill files."""
    net = getattr(model, part)
    channels_last = _memory_format(model) == torch.channels_last_3d
    steps = network_steps(net, shape[1])
    device = device or next(model.parameters()).device
    return Geometry(steps, shape[0], tuple(shape[2:]), channels_last, device.type, spill)


def _check_volume(x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
    if x.ndim != 5:
        raise ValueError(f"{what}: expected a 5-D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what}: expected {channels} channel(s), got shape {tuple(x.shape)}")
    if any(n % multiple for n in x.shape[2:]):
        raise ValueError(
            f"{what}: spatial size {tuple(x.shape[2:])} is not divisible by the downsampling factor "
            f"{multiple}; pad with medvae.inference.pad_to_multiple first"
        )


def _budget(memory_budget: int | None, device: torch.device) -> float:
    if memory_budget is None:
        return DEFAULT_BUDGET_FRACTION * available_bytes(device)
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    return float(memory_budget)


@contextlib.contextmanager
def _inference(model: VAE3D) -> Iterator[None]:
    """no_grad and eval mode (dropout off) for the call; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def plan_encode(model: VAE3D, shape: tuple[int, ...], memory_budget: int | None = None,
                spill_dir: str | os.PathLike | None = None) -> Plan:
    """The plan ``encode_volume`` would use for an input of ``shape`` (B, C, D, H, W).

    ``plan.peak_bytes`` is the estimated peak of extra memory (intermediate tensors, tiles and
    the returned moments; not the input or the weights); ``plan.spill_file_bytes`` the most disk
    its spill files take at once.
    """
    geometry = model_geometry(model, "encoder", tuple(shape), spill=spill_dir is not None)
    return plan_volume(geometry, _budget(memory_budget, next(model.parameters()).device))


def plan_decode(model: VAE3D, shape: tuple[int, ...], memory_budget: int | None = None,
                spill_dir: str | os.PathLike | None = None) -> Plan:
    """The plan ``decode_volume`` would use for a latent of ``shape`` (B, latent_channels, d, h, w)."""
    geometry = model_geometry(model, "decoder", tuple(shape), spill=spill_dir is not None)
    return plan_volume(geometry, _budget(memory_budget, next(model.parameters()).device))


def encode_volume(model: VAE3D, x: torch.Tensor, *, memory_budget: int | None = None,
                  spill_dir: str | os.PathLike | None = None) -> DiagonalGaussian:
    """Posterior of a whole volume, with peak extra memory under ``memory_budget`` bytes.

    Args:
        model: a VAE3D (put in eval mode for the call).
        x: (B, in_channels, D, H, W) normalised voxels; D, H, W multiples of
            ``model.downsampling_factor`` (see ``pad_to_multiple``).
        memory_budget: bytes for intermediate tensors, tiles and the result (not ``x`` or the
            weights). None: 80% of the memory free on ``x``'s device.
        spill_dir: an existing folder on a disk (not tmpfs) where the plan may keep full tensors
            in temporary files, deleted when the call ends. None: everything stays in memory.
    Returns:
        DiagonalGaussian over (B, latent_channels, D/f, H/f, W/f), float32; equal to
        ``model.encode(x)`` to float rounding. Autocast, if the caller enabled it, applies.
    Raises:
        ValueError: a bad shape, a budget below the smallest possible plan (the message names it), or
            a spill folder that is missing or lacks the space the plan needs.
    """
    _check_volume(x, model.arch.in_channels, "encode_volume", model.downsampling_factor)
    if spill_dir is not None:
        check_free_space(spill_dir, 0)
    geometry = model_geometry(model, "encoder", tuple(x.shape), x.device, spill=spill_dir is not None)
    plan = plan_volume(geometry, _budget(memory_budget, x.device), what="encode_volume")
    with _inference(model):
        if plan.one_pass:
            return model.encode(x)
        moments = run_plan(geometry, plan, x, _memory_format(model), spill_dir)
        return model.posterior(moments, x, inplace=True)


def encode_latent(
    model: VAE3D, x: torch.Tensor, *, memory_budget: int | None = None, sample: bool = False,
    generator: torch.Generator | None = None, spill_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Latent (B, latent_channels, D/f, H/f, W/f): the posterior mean, or a sample if ``sample``."""
    posterior = encode_volume(model, x, memory_budget=memory_budget, spill_dir=spill_dir)
    return posterior.sample(generator) if sample else posterior.mode()


def decode_volume(model: VAE3D, z: torch.Tensor, *, memory_budget: int | None = None,
                  spill_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Voxels (B, out_channels, d*f, h*f, w*f) from a latent (B, latent_channels, d, h, w), float32.

    Same budget semantics and guarantees as ``encode_volume``; equal to ``model.decode(z)``.
    """
    _check_volume(z, model.arch.latent_channels, "decode_volume", 1)
    if spill_dir is not None:
        check_free_space(spill_dir, 0)
    geometry = model_geometry(model, "decoder", tuple(z.shape), z.device, spill=spill_dir is not None)
    plan = plan_volume(geometry, _budget(memory_budget, z.device), what="decode_volume")
    with _inference(model):
        if plan.one_pass:
            return model.decode(z)
        return model.output(run_plan(geometry, plan, z, _memory_format(model), spill_dir), z, inplace=True)
