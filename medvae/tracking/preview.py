"""Tri-planar preview: mid-slices of input and reconstruction side by side, as a PNG (Pillow only).

Volumes are (D, H, W) arrays in the data pipeline's RAS order (axis 0 left->right, 1 posterior->
anterior, 2 inferior->superior). One row per volume, labelled; columns axial, coronal, sagittal, each
shown with anterior / superior up. Voxels are shown square (spacing is not taken into account). All
rows share the first volume's intensity window (its 0.5-99.5 percentiles), so a reconstruction that
is too dark or too bright shows as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvae.atomic import atomic_file

GAP = 4  # pixels between panels and around the image
LABEL_HEIGHT = 14  # pixels of the text strip above each row
WINDOW_PERCENTILES = (0.5, 99.5)


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a (D, H, W) RAS volume, each (rows, columns) for display."""
    x, y, z = (s // 2 for s in volume.shape)
    axial = volume[:, :, z].T[::-1]  # (H, D): anterior up
    coronal = volume[:, y, :].T[::-1]  # (W, D): superior up
    sagittal = volume[x, :, :].T[::-1]  # (W, H): superior up
    return [axial, coronal, sagittal]


def preview_size(shape: tuple[int, int, int], rows: int, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the preview of ``rows`` volumes of ``shape`` (D, H, W)."""
    d, h, w = (s * scale for s in shape)
    width = GAP + (d + GAP) + (d + GAP) + (h + GAP)
    height = GAP + rows * (LABEL_HEIGHT + max(h, w) + GAP)
    return width, height


def triplanar_preview(volumes: list[np.ndarray], labels: list[str], path: str | Path, scale: int = 1) -> Path:
    """Write the tri-planar preview of ``volumes`` (each (D, H, W), same shape) to ``path`` atomically.

    ``labels`` name the rows (e.g. ["input", "reconstruction"]); ``scale`` enlarges each voxel to
    scale x scale pixels. Returns the path. Non-finite voxels show as black.
    """
    from PIL import Image, ImageDraw

    if not volumes or len(volumes) != len(labels):
        raise ValueError(f"triplanar_preview: need one label per volume, got {len(volumes)} volumes, {len(labels)} labels")
    arrays = [np.asarray(v, dtype=np.float32) for v in volumes]
    shape = arrays[0].shape
    if len(shape) != 3 or any(a.shape != shape for a in arrays):
        raise ValueError(f"triplanar_preview: volumes must all be (D, H, W) of one shape, got {[a.shape for a in arrays]}")
    if scale < 1:
        raise ValueError(f"triplanar_preview: scale must be >= 1, got {scale}")

    finite = arrays[0][np.isfinite(arrays[0])]
    low, high = np.percentile(finite, WINDOW_PERCENTILES) if finite.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0

    canvas = Image.new("L", preview_size(shape, len(arrays), scale), color=0)
    draw = ImageDraw.Draw(canvas)
    row_height = LABEL_HEIGHT + max(shape[1], shape[2]) * scale + GAP
    for row, (array, label) in enumerate(zip(arrays, labels)):
        top = GAP + row * row_height
        draw.text((GAP, top), label, fill=255)
        left = GAP
        for plane in mid_slices(array):
            scaled = np.nan_to_num((plane - low) / (high - low), nan=0.0, posinf=0.0, neginf=0.0)
            pixels = (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)
            panel = Image.fromarray(np.ascontiguousarray(pixels))  # uint8 (rows, columns): mode L
            if scale > 1:
                panel = panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST)
            canvas.paste(panel, (left, top + LABEL_HEIGHT))
            left += panel.width + GAP
    path = Path(path)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
