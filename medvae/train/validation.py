"""Validation on held-out whole volumes: reconstruction PSNR and SSIM, and a tri-planar preview."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from monai.metrics import PSNRMetric, SSIMMetric

from medvae.models import VAE3D


@torch.no_grad()
def validate(model: VAE3D, val_set, accelerator: Accelerator, run_dir: Path, step: int, tracker) -> dict[str, float]:
    """Reconstruct every validation volume from its posterior mean; return mean PSNR/SSIM.

    Called on every rank: each rank reconstructs its share of the volumes (i = rank, rank + world,
    ...) and MONAI's cumulative metrics all-gather the per-volume scores in ``aggregate``. Metrics
    are on the normalised intensity scale with data range 1 (the [0, 1] presets); the first
    volume's input/reconstruction preview is written to ``run_dir/previews`` and logged.
    """
    from medvae.tracking.preview import reconstruction_preview

    was_training = model.training
    model.eval()
    psnr = PSNRMetric(max_val=1.0)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7)
    preview_path = None
    # SSIM needs 7 voxels a side; decide for the whole set so every rank gathers the same metrics.
    use_ssim = all(min(val_set[i]["image"].shape[1:]) >= 7 for i in range(len(val_set)))
    for index in range(accelerator.process_index, len(val_set), accelerator.num_processes):
        item = val_set[index]
        image = item["image"]
        x = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image))[None].to(accelerator.device)
        with accelerator.autocast():
            recon = model.decode(model.encode(x).mode())
        recon = recon.float()
        psnr(recon.clamp(0, 1), x.clamp(0, 1))
        if use_ssim:
            ssim(recon.clamp(0, 1), x.clamp(0, 1))
        if index == 0:
            spacing = [float(s) for s in image.pixdim] if hasattr(image, "pixdim") else None  # mm, (D, H, W)
            preview_path = reconstruction_preview(
                x[0, 0].cpu().numpy(), recon[0, 0].cpu().numpy(), Path(run_dir) / "previews" / f"step_{step:06d}.png",
                step=step, spacing=spacing, caption=f"held-out {item.get('id', '')}",
            )
    scores = {"val/psnr": float(psnr.aggregate().item())}
    if use_ssim:
        scores["val/ssim"] = float(ssim.aggregate().item())
    if preview_path is not None:
        tracker.image("val/preview", preview_path, step)
    if accelerator.is_main_process:
        ssim_text = f", SSIM {scores['val/ssim']:.3f}" if use_ssim else ""
        print(f"medvae: step {step}: held-out PSNR {scores['val/psnr']:.2f} dB{ssim_text} "
              f"({len(val_set)} volume{'s' if len(val_set) != 1 else ''})", flush=True)
    model.train(was_training)
    return scores
