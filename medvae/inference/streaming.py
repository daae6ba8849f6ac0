"""Run a plan: stream tiles through the steps, materialise cut tensors, gather GroupNorm statistics.

One tile of T_stop is computed from T_start by walking back from its interval to the interval each
step needs (halos grow by the kernel reach of every convolution, double through a stride-2 one,
halve through an upsampling), slicing that from T_start and running the steps forward. Tiles of a
pass never overlap, so their GroupNorm statistics merge into the whole volume's. A pass the plan
marks ``spill_output`` writes its tensor to a ``SpillFile`` in the caller's spill folder; the next
segment reads its tiles back from there. Each spill file is closed (and so deleted) as soon as the
next tensor is complete, and on any error.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os

import torch

from medvae.inference.planner import Geometry, Plan
from medvae.inference.spill import SpillFile, check_free_space
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
    geometry: Geometry, statistics: Statistics, source: torch.Tensor | SpillFile, start: int, stop: int,
    region: list[Interval], memory_format: torch.memory_format, device: torch.device,
) -> torch.Tensor:
    """The tile ``region`` of T_stop, computed exactly from the full tensor T_start."""
    steps, shapes = geometry.steps, geometry.shapes
    regions = {stop: region}
    for i in range(stop - 1, start - 1, -1):
        regions[i] = [steps[i].input_interval(a, regions[i + 1][a], shapes[i][a]) for a in range(3)]
    if isinstance(source, SpillFile):
        tile = source.read(regions[start]).to(device)
    else:
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


def run_plan(
    geometry: Geometry, plan: Plan, x: torch.Tensor, memory_format: torch.memory_format,
    spill_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Execute ``plan`` on the input T_0 = ``x``; return T_n (the only full tensor left).
    ``spill_dir``: the folder for the plan's spill files (needed if any pass spills)."""
    if any(p.spill_output for p in plan.passes):
        if spill_dir is None:
            raise ValueError("run_plan: the plan spills tensors to files, but no spill_dir was given")
        spill_dir = check_free_space(spill_dir, plan.spill_file_bytes)
    with contextlib.ExitStack() as files:
        return _run_passes(geometry, plan, x, memory_format, spill_dir, files)


def _run_passes(geometry, plan, x, memory_format, spill_dir, files: contextlib.ExitStack) -> torch.Tensor:
    steps = geometry.steps
    current, position = x, 0  # the last materialised tensor (in memory or in a spill file)
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
            tile = _run_tile(geometry, statistics, current, p.start, p.stop, region, memory_format, x.device)
            if gather is not None:
                gather.add(tile)
            if p.produce:
                if out is None:
                    shape = (x.shape[0], geometry.channels[p.stop], *geometry.shapes[p.stop])
                    if p.spill_output:
                        out = files.enter_context(SpillFile(spill_dir, shape, tile.dtype))
                    else:
                        out = torch.empty(shape, dtype=tile.dtype, device=tile.device, memory_format=memory_format)
                if p.spill_output:
                    out.write(region, tile)
                else:
                    out[_index(region)] = tile
            del tile
            release_freed_memory(x.device)
        if gather is not None:
            statistics[p.stop] = gather.result()
        if p.produce:
            if isinstance(current, SpillFile):
                current.close()  # its segment is done: free the disk now
            current, position = out, p.stop
        del out
        release_freed_memory(x.device)
    assert position == len(steps) and not isinstance(current, SpillFile)
    return current
