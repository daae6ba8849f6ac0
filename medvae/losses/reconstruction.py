"""Voxel reconstruction terms in float32: L1, MSE or Huber averaged over voxels, optionally plus 1 - SSIM
and an edge term (L1 between the spatial gradients of reconstruction and target)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # voxels per side of the Gaussian SSIM window (shrunk for smaller volumes)


def ssim_loss(recon: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """1 - mean 3D SSIM (MONAI's SSIMLoss) of (B, C, D, H, W) float32 tensors, a scalar.

    ``data_range`` sets SSIM's stability constants; None takes the target batch's max - min.
    """
    from monai.losses import SSIMLoss

    if data_range is None:
        data_range = max(float(target.detach().max() - target.detach().min()), 1e-6)
    smallest_side = min(target.shape[2:])
    window = min(SSIM_WINDOW, smallest_side if smallest_side % 2 else smallest_side - 1)
    if window < 3:
        raise ValueError(f"ssim_loss: volume {tuple(target.shape[2:])} is too small for a 3D SSIM window")
    return SSIMLoss(spatial_dims=3, data_range=data_range, win_size=window)(recon, target)


def gradient_difference_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the forward differences of ``recon`` and ``target`` along D, H and W, a scalar.

    A high-frequency term: it is zero for any constant offset and grows with blurred or misplaced
    edges, which a voxel L1/MSE weighs only by their few voxels. Axes of length 1 are skipped.
    """
    terms = [
        F.l1_loss(torch.diff(recon, dim=axis), torch.diff(target, dim=axis))
        for axis in range(2, recon.dim())
        if recon.shape[axis] > 1
    ]
    if not terms:
        raise ValueError(f"gradient_difference_loss: volume {tuple(target.shape[2:])} has no axis longer than 1")
    return torch.stack(terms).mean()


def reconstruction_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "l1",
    ssim_weight: float = 0.0,
    ssim_data_range: float | None = None,
    gradient_weight: float = 0.0,
    huber_delta: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Reconstruction term, float32 whatever autocast is active.

    Args:
        recon, target: (B, C, D, H, W), same shape, any float dtype (upcast to float32 first).
        kind: "l1" (mean absolute error), "mse" (mean squared error) or "huber" (the squared error
            where |error| <= huber_delta, 2 * huber_delta * |error| - huber_delta**2 beyond), averaged
            over every voxel. "huber" equals MSE wherever |error| <= huber_delta, and its gradient is bounded
            like L1's (2 * huber_delta per voxel) where errors are large, as in raw HU under fp16.
        huber_delta: where "huber" turns from quadratic to linear, in input intensity units.
        ssim_weight: weight of (1 - SSIM) added to the voxel term; 0 skips SSIM.
        ssim_data_range: intensity range for SSIM; None takes the target's max - min.
        gradient_weight: weight of ``gradient_difference_loss`` added to the voxel term; 0 skips it.

    Returns:
        loss: scalar float32 tensor; parts: {kind: float, "ssim": float (only when ssim_weight > 0),
        "gradient_difference": float (only when gradient_weight > 0)}.
    """
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction_loss: recon {tuple(recon.shape)} and target {tuple(target.shape)} differ")
    if kind not in ("l1", "mse", "huber"):
        raise ValueError(f"reconstruction_loss: kind must be 'l1', 'mse' or 'huber', got {kind!r}")
    if huber_delta <= 0:
        raise ValueError(f"reconstruction_loss: huber_delta must be > 0, got {huber_delta}")
    with torch.autocast(device_type=recon.device.type, enabled=False):
        recon, target = recon.float(), target.float()
        if kind == "l1":
            voxel_term = F.l1_loss(recon, target)
        elif kind == "mse":
            voxel_term = F.mse_loss(recon, target)
        else:  # the squared error inside +-delta, linear (slope 2 delta) beyond: MSE with a bounded gradient
            voxel_term = 2.0 * F.huber_loss(recon, target, delta=huber_delta)
        parts = {kind: float(voxel_term.detach())}
        loss = voxel_term
        if ssim_weight > 0:
            one_minus_ssim = ssim_loss(recon, target, ssim_data_range)
            parts["ssim"] = 1.0 - float(one_minus_ssim.detach())
            loss = loss + ssim_weight * one_minus_ssim
        if gradient_weight > 0:
            edge_term = gradient_difference_loss(recon, target)
            parts["gradient_difference"] = float(edge_term.detach())
            loss = loss + gradient_weight * edge_term
    return loss, parts
