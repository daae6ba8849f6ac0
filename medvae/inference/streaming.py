"""Run a plan: stream tiles through the steps, materialise cut tensors, gather GroupNorm statistics.

One tile of T_stop is computed from T_start by walking back from its interval to the interval each
step needs (halos grow by the kernel reach of every convolution, double through a stride-2 one,
halve through an upsampling), slicing that from T_start and running the steps forward. Tiles of a
pass never overlap, so their GroupNorm statistics merge into the whole volume's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools

import torch

from medvae.inference.planner import Geometry, Plan
from medvae.inference.statistics import GroupStatistics
from medvae.inference.steps import ConvStep, Interval, NormStep, WholeStep
from medvae.models.kernels import channels_last

Statistics = dict[int, tuple[torch.Tensor, torch.Tensor]]  # step index -> (mean, rstd), (B, groups)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory(device: torch.device) -> None:
    """Hand freed heap memory back to the OS (glibc keeps tiles under 32 MiB in its heap otherwise,
    and the next pass's differently sized tiles cannot reuse it: the resident set would grow)."""
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _tile_grid(shape: tuple[int, ...], tile: tuple[int, int, int]) -> list[list[Interval]]:
    axes = [[(s, min(s + t, n)) for s in range(0, n, t)] for n, t in zip(shape, tile)]
    return [list(region) for region in itertools.product(*axes)]


def _index(region: list[Interval]) -> tuple[slice, ...]:
    return (slice(None), slice(None), *(slice(a, b) for a, b in region))


def _run_tile(
    geometry: Geometry, statistics: Statistics, source: torch.Tensor, start: int, stop: int,
    region: list[Interval], memory_format: torch.memory_format,
) -> torch.Tensor:
    """The tile ``region`` of T_stop, computed exactly from the full tensor T_start."""
    steps, shapes = geometry.steps, geometry.shapes
    regions = {stop: region}
    for i in range(stop - 1, start - 1, -1):
        regions[i] = [steps[i].input_interval(a, regions[i + 1][a], shapes[i][a]) for a in range(3)]
    tile = source[_index(regions[start])]
    tile = channels_last(tile) if memory_format == torch.channels_last_3d else tile.contiguous()
    held: list[tuple[torch.Tensor, list[Interval]]] = []  # residual block inputs
    for i in range(start, stop):
        step = steps[i]
        if step.push_skip:
            held.append((tile, regions[i]))
        if isinstance(step, NormStep):
            tile = step.run_tile(tile, held, regions[i + 1], *statistics[i])
        elif isinstance(step, ConvStep):
            tile = step.run_tile(tile, held, regions[i + 1], regions[i], list(shapes[i]))
        else:  # pointwise ops only
            tile = step.run_tile(tile, held, regions[i + 1])
    return tile


def run_plan(geometry: Geometry, plan: Plan, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """Execute ``plan`` on the input T_0 = ``x``; return T_n (the only full tensor left)."""
    steps = geometry.steps
    current, position = x, 0  # the last materialised tensor
    statistics: Statistics = {}
    for p in plan.passes:
        assert p.start == position, (p, position)
        if isinstance(steps[p.start], WholeStep):
            current, position = steps[p.start].run_whole(current), p.stop
            continue
        gather = None
        if p.stop < len(steps) and isinstance(steps[p.stop], NormStep) and p.stop not in statistics:
            norm = steps[p.stop].norm
            gather = GroupStatistics(norm.num_groups, norm.eps)
        out = None
        for region in _tile_grid(geometry.shapes[p.stop], p.tile):
            tile = _run_tile(geometry, statistics, current, p.start, p.stop, region, memory_format)
            if gather is not None:
                gather.add(tile)
            if p.produce:
                if out is None:
                    shape = (x.shape[0], geometry.channels[p.stop], *geometry.shapes[p.stop])
                    out = torch.empty(shape, dtype=tile.dtype, device=tile.device, memory_format=memory_format)
                out[_index(region)] = tile
            del tile
            release_freed_memory(x.device)
        if gather is not None:
            statistics[p.stop] = gather.result()
        if p.produce:
            current, position = out, p.stop
        del out
        release_freed_memory(x.device)
    assert position == len(steps)
    return current
