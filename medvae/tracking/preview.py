"""Tri-planar previews as PNG files (Pillow only).

Volumes are (D, H, W) arrays in the data pipeline's RAS order (axis 0 left->right, 1 posterior->
anterior, 2 inferior->superior). Each plane is shown with anterior / superior up.

- ``reconstruction_preview``: what training writes at every validation. Rows axial, coronal,
  sagittal; columns input | reconstruction | absolute difference; every panel at least
  ``MIN_PANEL_PX`` pixels a side with voxels drawn at their physical aspect (``spacing`` in mm);
  a grey colour bar for the intensity window, a "hot" colour bar for the difference, and the step.
- ``triplanar_preview``: one row per volume, a voxel per pixel (times ``scale``); used for samples.

Input and reconstruction share the input's intensity window (its 0.5-99.5 percentiles), so a
reconstruction that is too dark or too bright shows as such. Non-finite voxels show as black.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medvae.atomic import atomic_file

GAP = 4  # pixels between panels and around the image
LABEL_HEIGHT = 14  # pixels of the text strip above each row
WINDOW_PERCENTILES = (0.5, 99.5)
MIN_PANEL_PX = 192  # smallest panel side of a reconstruction preview
PANEL_PX = 256  # default panel side of a reconstruction preview
COLUMNS = ("input", "reconstruction", "|difference|")
PLANES = ("axial", "coronal", "sagittal")
HEADER_PX = 24  # title strip (step) above the panels
COLUMN_LABEL_PX = 16  # column names above the first row
ROW_LABEL_PX = 64  # plane names left of each row
BAR_WIDTH = 16  # colour bar width, pixels
BAR_LABEL_PX = 64  # room for the colour bar's numbers


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a (D, H, W) RAS volume, each (rows, columns) for display."""
    x, y, z = (s // 2 for s in volume.shape)
    axial = volume[:, :, z].T[::-1]  # (H, D): anterior up
    coronal = volume[:, y, :].T[::-1]  # (W, D): superior up
    sagittal = volume[x, :, :].T[::-1]  # (W, H): superior up
    return [axial, coronal, sagittal]


def _slice_spacing(spacing: tuple[float, float, float]) -> list[tuple[float, float]]:
    """(row, column) pixel spacing in mm of each plane of ``mid_slices``."""
    sd, sh, sw = spacing
    return [(sh, sd), (sw, sd), (sw, sh)]


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """(low, high) display window: the 0.5 and 99.5 percentiles of the finite voxels."""
    finite = volume[np.isfinite(volume)]
    low, high = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES)) if finite.size else (0.0, 1.0)
    return low, (high if high > low else low + 1.0)


def _unit(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """``plane`` mapped to [0, 1] by the window; non-finite voxels -> 0."""
    return np.clip(np.nan_to_num((plane - low) / (high - low), nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)


def hot(unit: np.ndarray) -> np.ndarray:
    """The 'hot' colour map (black, red, yellow, white) of values in [0, 1]: (..., 3) uint8."""
    rgb = np.stack([np.clip(3 * unit - k, 0.0, 1.0) for k in range(3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def grey(unit: np.ndarray) -> np.ndarray:
    """Grey levels of values in [0, 1] as (..., 3) uint8."""
    return np.repeat((unit * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def reconstruction_preview_size(panel_px: int = PANEL_PX) -> tuple[int, int]:
    """(width, height) in pixels of a reconstruction preview with ``panel_px`` panels."""
    width = GAP + ROW_LABEL_PX + len(COLUMNS) * (panel_px + GAP) + 2 * (BAR_WIDTH + BAR_LABEL_PX)
    height = GAP + HEADER_PX + COLUMN_LABEL_PX + len(PLANES) * (panel_px + GAP)
    return width, height


def panel_box(row: int, column: int, panel_px: int = PANEL_PX) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of the panel of plane ``row`` and column ``column``."""
    left = GAP + ROW_LABEL_PX + column * (panel_px + GAP)
    top = GAP + HEADER_PX + COLUMN_LABEL_PX + row * (panel_px + GAP)
    return left, top, left + panel_px, top + panel_px


def bar_box(index: int, panel_px: int = PANEL_PX) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of colour bar ``index`` (0: intensity, 1: difference)."""
    left = GAP + ROW_LABEL_PX + len(COLUMNS) * (panel_px + GAP) + index * (BAR_WIDTH + BAR_LABEL_PX)
    top = GAP + HEADER_PX + COLUMN_LABEL_PX
    return left, top, left + BAR_WIDTH, top + len(PLANES) * (panel_px + GAP) - GAP


def _fit_panel(rgb: np.ndarray, pixel_mm: tuple[float, float], panel_px: int):
    """An RGB slice enlarged (nearest neighbour) to fit a ``panel_px`` square at its physical aspect."""
    from PIL import Image

    rows, columns = rgb.shape[:2]
    height_mm, width_mm = rows * pixel_mm[0], columns * pixel_mm[1]
    zoom = panel_px / max(height_mm, width_mm)
    size = (max(1, round(width_mm * zoom)), max(1, round(height_mm * zoom)))
    return Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.NEAREST)


def reconstruction_preview(image: np.ndarray, reconstruction: np.ndarray, path: str | Path, step: int,
                           spacing: tuple[float, float, float] | None = None, panel_px: int = PANEL_PX,
                           caption: str = "") -> Path:
    """Write the input | reconstruction | |difference| preview of one volume to ``path`` atomically.

    ``image``, ``reconstruction``: (D, H, W) arrays of one shape, same units. ``spacing``: voxel
    size in mm along (D, H, W) (None: isotropic). ``step`` and ``caption`` go in the title.
    The image is ``reconstruction_preview_size(panel_px)``; returns ``path``.
    """
    from PIL import Image, ImageDraw

    arrays = [np.asarray(v, dtype=np.float32) for v in (image, reconstruction)]
    if arrays[0].ndim != 3 or arrays[0].shape != arrays[1].shape:
        raise ValueError(f"reconstruction_preview: need two (D, H, W) volumes of one shape, "
                         f"got {arrays[0].shape} and {arrays[1].shape}")
    if panel_px < MIN_PANEL_PX:
        raise ValueError(f"reconstruction_preview: panel_px must be >= {MIN_PANEL_PX}, got {panel_px}")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"reconstruction_preview: spacing must be three positive sizes in mm, got {spacing}")
    low, high = intensity_window(arrays[0])
    difference = np.abs(arrays[1] - arrays[0])
    finite_difference = difference[np.isfinite(difference)]
    diff_high = float(np.percentile(finite_difference, WINDOW_PERCENTILES[1])) if finite_difference.size else 0.0
    diff_high = diff_high if diff_high > 0 else 1e-6

    canvas = Image.new("RGB", reconstruction_preview_size(panel_px), color=(0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    draw.text((GAP, GAP), f"step {step}" + (f"   {caption}" if caption else ""), fill=(255, 255, 255), font=font)
    columns = [(grey, arrays[0], low, high), (grey, arrays[1], low, high), (hot, difference, 0.0, diff_high)]
    for column, name in enumerate(COLUMNS):
        left, top, _, _ = panel_box(0, column, panel_px)
        draw.text((left, top - COLUMN_LABEL_PX), name, fill=(255, 255, 255), font=small)
    for column, (colour_map, array, lo, hi) in enumerate(columns):
        for row, (plane, pixel_mm) in enumerate(zip(mid_slices(array), _slice_spacing(spacing))):
            panel = _fit_panel(colour_map(_unit(plane, lo, hi)), pixel_mm, panel_px)
            left, top, _, _ = panel_box(row, column, panel_px)
            canvas.paste(panel, (left + (panel_px - panel.width) // 2, top + (panel_px - panel.height) // 2))
    for row, name in enumerate(PLANES):
        _, top, _, bottom = panel_box(row, 0, panel_px)
        draw.text((GAP, (top + bottom) // 2 - 6), name, fill=(255, 255, 255), font=small)
    for index, (colour_map, lo, hi) in enumerate([(grey, low, high), (hot, 0.0, diff_high)]):
        left, top, right, bottom = bar_box(index, panel_px)
        ramp = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(BAR_WIDTH, axis=1)  # top = high
        canvas.paste(Image.fromarray(colour_map(ramp)), (left, top))
        draw.text((right + 2, top), f"{hi:.3g}", fill=(255, 255, 255), font=small)
        draw.text((right + 2, bottom - 12), f"{lo:.3g}", fill=(255, 255, 255), font=small)
    path = Path(path)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def readable_scale(shape: tuple[int, ...]) -> int:
    """Whole-number enlargement that brings the largest side of ``shape`` to at least MIN_PANEL_PX pixels
    (1 for volumes that are already that large): voxels stay square blocks, nothing is interpolated."""
    return max(1, math.ceil(MIN_PANEL_PX / max(1, max(int(s) for s in shape))))


def preview_size(shape: tuple[int, int, int], rows: int, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the triplanar preview of ``rows`` volumes of ``shape`` (D, H, W)."""
    d, h, w = (s * scale for s in shape)
    width = GAP + (d + GAP) + (d + GAP) + (h + GAP)
    height = GAP + rows * (LABEL_HEIGHT + max(h, w) + GAP)
    return width, height


def triplanar_preview(volumes: list[np.ndarray], labels: list[str], path: str | Path, scale: int = 1) -> Path:
    """Write the tri-planar preview of ``volumes`` (each (D, H, W), same shape) to ``path`` atomically.

    ``labels`` name the rows (e.g. ["sample_000"]); ``scale`` enlarges each voxel to
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

    low, high = intensity_window(arrays[0])
    canvas = Image.new("L", preview_size(shape, len(arrays), scale), color=0)
    draw = ImageDraw.Draw(canvas)
    row_height = LABEL_HEIGHT + max(shape[1], shape[2]) * scale + GAP
    for row, (array, label) in enumerate(zip(arrays, labels)):
        top = GAP + row * row_height
        draw.text((GAP, top), label, fill=255)
        left = GAP
        for plane in mid_slices(array):
            pixels = (_unit(plane, low, high) * 255).round().astype(np.uint8)
            panel = Image.fromarray(np.ascontiguousarray(pixels))  # uint8 (rows, columns): mode L
            if scale > 1:
                panel = panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST)
            canvas.paste(panel, (left, top + LABEL_HEIGHT))
            left += panel.width + GAP
    path = Path(path)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
