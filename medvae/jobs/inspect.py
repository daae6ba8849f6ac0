"""``medvae inspect INPUT...``: what a volume is, and what the preprocessing will do to it.

For each input: shape, spacing, orientation code, modality and units, intensity range with the
0.5 / 50 / 99.5 percentiles; then the pipeline of ``build_transforms(phase="infer")`` run on it:
reorientation, target spacing and the resulting shape, the intensity preset with the parameters
this volume would get, and the padding to the model's downsampling factor. The first bad input
stops with its one-line error.
"""

from __future__ import annotations

import os

import click
import numpy as np

from medvae.config import Config, load_config

PERCENTILES = (0.5, 50.0, 99.5)


def _mm(values) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values) + " mm"


def _shape(values) -> str:
    return "x".join(str(int(v)) for v in values)


def _intensity_text(params: dict) -> str:
    clip = ", clipped" if params.get("clip") else ""
    if params["preset"] == "ct_window":
        return f"ct_window: HU {params['a_min']:g}..{params['a_max']:g} -> [0, 1]{clip}"
    if params["preset"] == "mri_percentile":
        return (f"mri_percentile: {params['lower_percentile']:g}th..{params['upper_percentile']:g}th percentile "
                f"= {params['a_min']:.6g}..{params['a_max']:.6g} -> [0, 1]{clip}")
    return (f"zscore: (x - {params['mean']:.6g}) / {params['std']:.6g} "
            f"(foreground = voxels > {params['foreground_threshold']:g})")


def describe(path: str, config: Config, modality: str | None, series: str | None, frame: int | None,
             downsampling_factor: int) -> list[str]:
    """The report lines for one input (raises the reader's one-line error for a bad one)."""
    from medvae.data.transforms import build_transforms
    from medvae.io import read_volume

    data = config.data
    volume = read_volume(path, series=series, frame=frame, nonfinite=data.nonfinite)
    if modality:
        modality_source = "from --modality"
    elif volume.modality in ("CT", "MR"):
        modality, modality_source = volume.modality, "from the file"
    else:
        modality, modality_source = data.modality, "not in the file; from data.modality"
    low, mid, high = np.percentile(volume.array, PERCENTILES)
    lines = [
        str(volume.source or path),
        f"  shape        {_shape(volume.shape)} voxels",
        f"  spacing      {_mm(volume.spacing)}",
        f"  orientation  {volume.orientation}",
        f"  modality     {modality} ({modality_source}), units {volume.units or 'unknown'}",
        f"  intensity    min {volume.array.min():.6g}, p0.5 {low:.6g}, p50 {mid:.6g}, p99.5 {high:.6g}, "
        f"max {volume.array.max():.6g}",
    ]

    pipeline = build_transforms(data, "infer", downsampling_factor)
    image = pipeline({"image": volume, "id": "inspect", "modality": modality})["image"]
    sizes = {op["class"]: [int(n) for n in op["orig_size"]] for op in image.applied_operations}
    final = [int(n) for n in image.shape[1:]]
    before_pad = sizes.get("DivisiblePad", final)  # after orientation and spacing
    lines.append("  preprocessing")
    lines.append(f"    orientation  {volume.orientation} -> {data.orientation}")
    if data.spacing is None:
        lines.append(f"    spacing      kept ({_mm(volume.spacing)})")
    else:
        resampled_from = sizes.get("SpatialResample", before_pad)  # the reoriented grid
        lines.append(f"    spacing      {_mm(volume.spacing)} -> {_mm(data.spacing)}: shape "
                     f"{_shape(resampled_from)} -> {_shape(before_pad)}")
    lines.append(f"    intensity    {_intensity_text(dict(image.meta['intensity']))}")
    if before_pad != final:
        lines.append(f"    padding      {_shape(before_pad)} -> {_shape(final)} "
                     f"(next multiple of the downsampling factor {downsampling_factor})")
    else:
        lines.append(f"    padding      none: {_shape(final)} is a multiple of {downsampling_factor}")
    lines.append(f"    network in   (1, 1, {', '.join(str(n) for n in final)})")
    return lines


def inspect(inputs: list[str], config_path: str | os.PathLike | None = None, modality: str | None = None,
            series: str | None = None, frame: int | None = None) -> None:
    """Print the report for each input; the downsampling factor comes from ``model.channels``."""
    if not inputs:
        raise ValueError("inspect: give at least one input file or folder")
    config = load_config(config_path)
    downsampling_factor = 2 ** (len(config.model.channels) - 1)  # one stride-2 step between levels
    for index, path in enumerate(inputs):
        if index:
            click.echo("")
        for line in describe(str(path), config, modality, series, frame, downsampling_factor):
            click.echo(line)
