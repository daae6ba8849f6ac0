"""Voxel reconstruction terms in float32: L1 or MSE averaged over voxels, optionally plus 1 - SSIM."""

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


def reconstruction_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "l1",
    ssim_weight: float = 0.0,
    ssim_data_range: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Reconstruction term, float32 whatever autocast is active.

    Args:
        recon, target: (B, C, D, H, W), same shape, any float dtype (upcast to float32 first).
        kind: "l1" (mean absolute error) or "mse" (mean squared error), averaged over every voxel.
        ssim_weight: weight of (1 - SSIM) added to the voxel term; 0 skips SSIM.
        ssim_data_range: intensity range for SSIM; None takes the target's max - min.

    Returns:
        loss: scalar float32 tensor; parts: {kind: float, "ssim": float (only when ssim_weight > 0)}.
    """
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction_loss: recon {tuple(recon.shape)} and target {tuple(target.shape)} differ")
    if kind not in ("l1", "mse"):
        raise ValueError(f"reconstruction_loss: kind must be 'l1' or 'mse', got {kind!r}")
    with torch.autocast(device_type=recon.device.type, enabled=False):
        recon, target = recon.float(), target.float()
        voxel_term = F.l1_loss(recon, target) if kind == "l1" else F.mse_loss(recon, target)
        parts = {kind: float(voxel_term.detach())}
        loss = voxel_term
        if ssim_weight > 0:
            one_minus_ssim = ssim_loss(recon, target, ssim_data_range)
            parts["ssim"] = 1.0 - float(one_minus_ssim.detach())
            loss = loss + ssim_weight * one_minus_ssim
    return loss, parts
