"""Choose how to split a whole-volume pass so that its peak memory stays under a budget.

Positions 0..n name the tensors T_0 (input) .. T_n (output) between the n steps. A plan cuts the
steps into segments at positions whose tensor is materialised in full (never inside a residual
block). Each segment streams tiles from its source tensor to its end tensor, with halos that grow
with the number of convolutions in between; every GroupNorm inside a segment first needs the
statistics of its whole input, which costs one extra streaming pass from the segment's source
(a "statistics pass"). Long segments save memory (fewer full tensors) and cost recomputation;
``plan_volume`` finds the cheapest plan (fewest conv flops, by dynamic programming over the cut
positions and the tile shape of every pass) whose estimated peak fits the budget.

With a spill folder (``spill=True``), a full tensor at a cut may instead live in a temporary file
there (``medvae.inference.spill``): it then costs no memory, but every pass that writes or reads
it moves its bytes through the file, charged at ``SPILL_BYTE_FLOPS`` conv-flop equivalents per
byte. Where the budget cannot hold the full-resolution tensors, that turns the statistics passes
(recomputing the chain from a coarse source) into one write and one read per tensor.

Memory model (bytes): the full tensors alive during a pass (its source unless that is the
caller's input or spilled, and its output unless spilled), plus the largest set of tiles alive at once while one tile runs
through the steps (input, zero-padded copy, output, oneDNN/cuDNN workspace, the residual block's
input). Elements count as float32. ``estimate_one_pass_bytes`` models the model's own forward.
The estimates were checked against measured peaks (benchmarks/inference_memory.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medvae.inference.steps import ConvStep, NormStep, Step, WholeStep
from medvae.models.capability import onednn_convolution_ok

ELEMENT_BYTES = 4
# Python and launch overhead of running one step on one tile, in conv-flop equivalents (about 0.1 ms
# of CPU conv work; about 50 us of GPU work): keeps the planner from choosing thousands of tiny
# tiles when larger ones fit.
TILE_STEP_OVERHEAD_FLOPS = {"cpu": 2e7, "cuda": 2e9}
# Measured peaks exceed the tensor count by allocator slack, small temporaries, kernel workspaces and
# fixed costs. Factors from measurements (benchmarks/RESULTS.md, "Inference memory"): CPU resident
# set on this 2-core machine; CUDA max_memory_allocated on an H200, where cuDNN's workspaces and the
# model's own one-pass forward took up to 9% and 16% more than the tensor count.
SAFETY_FACTOR = {"cpu": 1.1, "cuda": 1.25}
ONE_PASS_SAFETY_FACTOR = {"cpu": 1.1, "cuda": 1.4}
SAFETY_BYTES = 32 * 2**20
# Moving one byte to or from a spill file, in conv-flop equivalents (the planner's exchange rate).
# CPU: this 2-core machine ran ~100 GFLOP/s of conv3d and read/wrote its disk at 0.4-8 GB/s
# (page cache to a fresh virtual disk): 100 flops per byte. CUDA: a spilled tile goes file -> host
# -> device; taken as ~10 GB/s against ~30 TFLOP/s, an estimate, not a measurement.
SPILL_BYTE_FLOPS = {"cpu": 100.0, "cuda": 3000.0}
SPILL_CALL_FLOPS = {"cpu": 4e5, "cuda": 1e8}  # per read or write call (~4 us measured here)  # first-use oneDNN kernels and scratch, Python objects
TILE_EDGES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class Pass:
    """Stream tiles of T_stop, computed from T_start; write them to a full tensor or only reduce them."""

    start: int
    stop: int
    tile: tuple[int, int, int]  # tile shape on the grid of T_stop
    produce: bool  # True: materialise T_stop; False: GroupNorm statistics of T_stop only
    flops: float
    peak_bytes: int
    tiles: int = 1
    spill_output: bool = False  # T_stop goes to a spill file (produce only)
    spill_bytes: int = 0  # bytes read from and written to spill files
    cost: float = 0.0  # flops + spill traffic in flop equivalents: what the planner minimises


@dataclass(frozen=True)
class Plan:
    """Passes in execution order; ``one_pass`` means: call the model directly."""

    passes: tuple[Pass, ...]
    peak_bytes: int
    flops: float
    one_pass: bool = False
    spill_file_bytes: int = 0  # the most bytes held in spill files at once

    @property
    def spill_bytes(self) -> int:
        """Bytes moved through spill files in all passes."""
        return sum(p.spill_bytes for p in self.passes)

    @property
    def tiles(self) -> int:
        """Tiles (and whole-tensor steps) run in all passes together; 0 for one pass."""
        return sum(p.tiles for p in self.passes)


class Geometry:
    """Shapes and channels of every tensor T_0..T_n for one input shape."""

    def __init__(self, steps: list[Step], batch: int, shape: tuple[int, int, int], channels_last: bool,
                 device_type: str = "cpu", spill: bool = False):
        self.steps = steps
        self.spill = spill  # a spill folder is available: cut tensors may live in files
        self.batch = batch
        self.channels_last = channels_last
        self.device_type = device_type
        self.shapes = [tuple(shape)]
        for step in steps:
            self.shapes.append(tuple(step.output_length(a, n) for a, n in enumerate(self.shapes[-1])))
        self.channels = [steps[0].in_channels] + [s.out_channels for s in steps]
        self.block_of: dict[int, int] = {}  # step index inside a residual segment -> the step opening it
        self._extents: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}
        opened: list[int] = []  # steps whose residual segments are open (innermost last)
        self.open_after: list[int] = []  # residual segments still open after each step
        for i, step in enumerate(steps):
            if step.push_skip:
                opened.append(i)
            if opened:
                self.block_of[i] = opened[-1]
            for _ in range(step.closes):
                opened.pop()
            self.open_after.append(len(opened))

    def conv_workspace(self, index: int, out_edges: list[int]) -> int:
        """Bytes a convolution allocates besides its output, for an output tile of ``out_edges``.

        CPU, channels-last: oneDNN directly (``kernels.conv3d``), measured at a fraction of the
        output. CPU, contiguous or reference kernels (``F.conv3d``): PyTorch runs a float32 conv3d with B * C_in * D_in * H_in <= 20480
        (small tiles, 1-channel inputs) as im2col + GEMM with a column buffer of
        C_in * kernel volume * output voxels, larger ones through oneDNN with a reordered input
        and output. CUDA: cuDNN's workspace, taken as one output tile.
        """
        step = self.steps[index]
        assert isinstance(step, ConvStep)
        b, e, c_in = self.batch, ELEMENT_BYTES, self.channels[index]
        out = b * step.out_channels * math.prod(out_edges) * e
        if step.upsample or self.device_type != "cpu":
            return out
        if self.channels_last and onednn_convolution_ok(torch.float32):
            return out // 4
        k, s = step.conv.kernel_size, step.conv.stride
        padded = [s[a] * (out_edges[a] - 1) + k[a] for a in range(3)]
        if b * c_in * padded[0] * padded[1] <= 20480:
            return c_in * math.prod(k) * math.prod(out_edges) * e
        return out + b * c_in * math.prod(padded) * e

    def with_margin(self, tensor_bytes: float, factors: dict[str, float] = SAFETY_FACTOR) -> int:
        """An estimate of the measured peak from the bytes of the tensors alive at once."""
        return int(factors.get(self.device_type, factors["cuda"]) * tensor_bytes) + SAFETY_BYTES

    def full_bytes(self, position: int) -> int:
        return self.batch * self.channels[position] * math.prod(self.shapes[position]) * ELEMENT_BYTES

    def can_cut(self, position: int) -> bool:
        """A full tensor may be kept here: not between a residual block's input and its output."""
        if position in (0, len(self.steps)):
            return True
        return self.open_after[position - 1] == 0

    def axis_extents(self, stop: int, axis: int, tile: int) -> tuple[tuple[int, int], ...]:
        """For tiles of edge ``tile`` along ``axis`` of T_stop: (sum, max) of interval lengths at
        every position 0..stop (positions before a WholeStep are not reachable: (0, 0))."""
        if (stop, axis, tile) not in self._extents:
            self._extents[stop, axis, tile] = self._axis_extents(stop, axis, tile)
        return self._extents[stop, axis, tile]

    def _axis_extents(self, stop: int, axis: int, tile: int) -> tuple[tuple[int, int], ...]:
        n = self.shapes[stop][axis]
        intervals = [(s, min(s + tile, n)) for s in range(0, n, tile)]
        extents = [(0, 0)] * (stop + 1)
        extents[stop] = (n, max(b - a for a, b in intervals))
        for i in range(stop - 1, -1, -1):
            step = self.steps[i]
            if isinstance(step, WholeStep):
                break
            n_in = self.shapes[i][axis]
            intervals = [step.input_interval(axis, iv, n_in) for iv in intervals]
            lengths = [b - a for a, b in intervals]
            extents[i] = (sum(lengths), max(lengths))
        return tuple(extents)

    def pass_cost(self, start: int, stop: int, tile: tuple[int, int, int]) -> tuple[float, int]:
        """(flops, bytes of tiles alive at once) of streaming tiles of T_stop from T_start."""
        extents = [self.axis_extents(stop, axis, tile[axis]) for axis in range(3)]
        n_tiles = math.prod(math.ceil(self.shapes[stop][a] / tile[a]) for a in range(3))
        total = lambda p: math.prod(extents[a][p][0] for a in range(3))  # noqa: E731
        largest = lambda p: math.prod(extents[a][p][1] for a in range(3))  # noqa: E731
        b, e = self.batch, ELEMENT_BYTES
        flops = 0.0
        tile_in = b * self.channels[start] * largest(start) * e  # the source tile (a copy)
        work = tile_in
        for i in range(start, stop):
            step = self.steps[i]
            skip_channels = self.channels[self.block_of[i]] if i in self.block_of else 0
            flops += step.flops_per_output_voxel(skip_channels) * total(i + 1) * b
            flops += TILE_STEP_OVERHEAD_FLOPS.get(self.device_type, 2e9) * n_tiles
            tile_out = b * self.channels[i + 1] * largest(i + 1) * e
            held = 0  # the residual block's input tile, kept for its skip connection
            if i in self.block_of and self.block_of[i] >= start and self.block_of[i] != i:
                held = b * self.channels[self.block_of[i]] * largest(self.block_of[i]) * e
            if isinstance(step, ConvStep):
                out_edges = [extents[a][i + 1][1] for a in range(3)]
                if step.upsample:  # zero-padded coarse tile -> upsampling conv -> cropped view
                    coarse = [edge // 2 + 3 for edge in out_edges]
                    padded = b * self.channels[i] * math.prod(coarse) * e
                    out_edges = [2 * c - 4 for c in coarse]
                    tile_out = b * self.channels[i + 1] * math.prod(out_edges) * e
                    # sub-pixel: the phase outputs before interleaving; reference: the upsampled tile
                    upsampled = tile_out if step.subpixel else 8 * padded
                else:
                    k, s = step.conv.kernel_size, step.conv.stride
                    padded = b * self.channels[i] * math.prod(s[a] * (out_edges[a] - 1) + k[a] for a in range(3)) * e
                    upsampled = 8 * tile_in if step.upsample else 0
                workspace = self.conv_workspace(i, out_edges)
                live = held + tile_in + upsampled + padded + tile_out + workspace
                if step.closes:  # after the conv: output, cropped block input, skip output
                    live = max(live, held + 3 * tile_out)
            else:
                live = held + tile_in + tile_out
            work = max(work, live)
            tile_in = tile_out
        # GroupNorm statistics of the last tile: its deviations from the channel means, one more tile
        return flops, max(work, 2 * tile_in)


    def spill_traffic(self, start: int, stop: int, tile: tuple[int, int, int], read: bool, write: bool) -> tuple[int, int]:
        """(bytes, calls) of a pass that reads its source tiles from a spill file and/or writes its
        output tiles to one. A file keeps (B, D, H, W, C) order: a tile is one call per batch item
        when it spans H and W, one per D plane when it spans W, else one per row."""
        b, e = self.batch, ELEMENT_BYTES
        n_tiles = math.prod(math.ceil(self.shapes[stop][a] / tile[a]) for a in range(3))
        full_h, full_w = (tile[a] >= self.shapes[stop][a] for a in (1, 2))
        nbytes, calls = 0, 0
        if read:
            extents = [self.axis_extents(stop, axis, tile[axis])[start] for axis in range(3)]
            nbytes += b * self.channels[start] * math.prod(total for total, _ in extents) * e
            d, h = extents[0][1], extents[1][1]
            calls += n_tiles * b * (1 if full_h and full_w else d if full_w else d * h)
        if write:
            nbytes += self.full_bytes(stop)
            d, h = (min(tile[a], self.shapes[stop][a]) for a in (0, 1))
            calls += n_tiles * b * (1 if full_h and full_w else d if full_w else d * h)
        return nbytes, calls


def _whole_step_bytes(geometry: Geometry, index: int) -> int:
    """Working memory of a module run on the whole tensor (self-attention): about 8 full tensors
    (normalised input, q, k, v, output, projection) plus 2.5 x heads x tokens^2 attention scores
    (scores and softmax of the math kernel, which CPU float32 attention was measured to take)."""
    tokens = math.prod(geometry.shapes[index])
    heads = getattr(geometry.steps[index].module, "num_heads", 1)
    return 8 * geometry.full_bytes(index) + int(2.5 * geometry.batch * heads * tokens**2 * ELEMENT_BYTES)


def _tile_shapes(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Cubes, columns and slabs (small edge on D first: W stays contiguous), balanced per axis."""
    out = set()
    for t in TILE_EDGES:
        for form in ((t, t, t), (t, t, 10**9), (t, 10**9, 10**9)):
            tile = []
            for edge, n in zip(form, shape):
                m = math.ceil(n / min(edge, n))
                tile.append(math.ceil(n / m))
            out.add(tuple(tile))
        if t >= max(shape):
            break
    return sorted(out)


def _best_pass(geometry: Geometry, start: int, stop: int, produce: bool, budget: float,
               spilled: tuple[bool, bool] = (False, False)) -> Pass | None:
    """The cheapest tiling of the pass that fits ``budget``; the smallest one if budget is inf.
    ``spilled``: (T_start is read from a spill file, T_stop is written to one)."""
    read, write = spilled[0], produce and spilled[1]
    fixed = (geometry.full_bytes(start) if start > 0 and not read else 0)
    fixed += geometry.full_bytes(stop) if produce and not write else 0
    byte_flops = SPILL_BYTE_FLOPS.get(geometry.device_type, SPILL_BYTE_FLOPS["cuda"])
    call_flops = SPILL_CALL_FLOPS.get(geometry.device_type, SPILL_CALL_FLOPS["cuda"])
    fitting = []
    for tile in _tile_shapes(geometry.shapes[stop]):
        flops, work = geometry.pass_cost(start, stop, tile)
        peak = geometry.with_margin(fixed + work)
        if peak <= budget:
            tiles = math.prod(math.ceil(n / t) for n, t in zip(geometry.shapes[stop], tile))
            nbytes, calls = geometry.spill_traffic(start, stop, tile, read, write) if read or write else (0, 0)
            cost = flops + byte_flops * nbytes + call_flops * calls
            fitting.append(Pass(start, stop, tile, produce, flops, peak, tiles, write, nbytes, cost))
    if not fitting:
        return None
    if budget == math.inf:
        return min(fitting, key=lambda p: (p.peak_bytes, p.cost))
    return min(fitting, key=lambda p: (p.cost, -p.peak_bytes))  # ties: the larger tiles


def _segment(geometry: Geometry, start: int, stop: int, budget: float, best_pass,
             spilled: tuple[bool, bool] = (False, False)) -> list[Pass] | None:
    """Passes that take T_start to a full T_stop, or None if a WholeStep is in the way or none fits.
    ``spilled``: (T_start is in a spill file, T_stop goes to one)."""
    steps = geometry.steps
    if any(isinstance(s, WholeStep) for s in steps[start:stop]):
        if stop - start != 1 or any(spilled):
            return None
        fixed = (geometry.full_bytes(start) if start > 0 else 0) + geometry.full_bytes(stop)
        work = _whole_step_bytes(geometry, start)
        peak = geometry.with_margin(fixed + work)
        return [Pass(start, stop, (0, 0, 0), True, 0.0, peak)] if peak <= budget else None
    passes = []
    source = (spilled[0], False)
    if isinstance(steps[start], NormStep) and (start == 0 or isinstance(steps[start - 1], WholeStep)):
        passes.append(best_pass(start, start, False, source))  # statistics of T_start itself
    for k in range(start + 1, stop):
        if isinstance(steps[k], NormStep):
            passes.append(best_pass(start, k, False, source))
    passes.append(best_pass(start, stop, True, spilled))
    return None if any(p is None for p in passes) else passes


def _search(geometry: Geometry, budget: float) -> Plan | None:
    """Dynamic programme over cut positions (and, with a spill folder, where each cut tensor lives):
    the least cost under ``budget``, or the smallest peak when ``budget`` is inf."""
    n = len(geometry.steps)
    cuts = [p for p in range(n + 1) if geometry.can_cut(p)]
    memo: dict[tuple, Pass | None] = {}

    def best_pass(start: int, stop: int, produce: bool, spilled: tuple[bool, bool]) -> Pass | None:
        key = (start, stop, produce, spilled)
        if key not in memo:
            memo[key] = _best_pass(geometry, start, stop, produce, budget, spilled)
        return memo[key]

    def rank(entry) -> tuple[float, float]:
        cost, peak, _, _ = entry
        return (peak, cost) if budget == math.inf else (cost, peak)

    def kinds(position: int) -> tuple[bool, ...]:
        """Where T_position may live: in memory, or (not the input or output) in a spill file."""
        return (False, True) if geometry.spill and 0 < position < n else (False,)

    # (position, in a spill file) -> (cost, peak, spill file bytes at once, passes)
    best: dict[tuple[int, bool], tuple[float, int, int, list[Pass]]] = {(0, False): (0.0, 0, 0, [])}
    for stop in cuts[1:]:
        for stop_spilled in kinds(stop):
            for start in cuts:
                for start_spilled in kinds(start):
                    if start >= stop or (start, start_spilled) not in best:
                        continue
                    passes = _segment(geometry, start, stop, budget, best_pass, (start_spilled, stop_spilled))
                    if passes is None:
                        continue
                    cost, peak, files, before = best[start, start_spilled]
                    held = (geometry.full_bytes(start) if start_spilled else 0) + (geometry.full_bytes(stop) if stop_spilled else 0)
                    entry = (cost + sum(p.cost for p in passes), max([peak] + [p.peak_bytes for p in passes]),
                             max(files, held), before + passes)
                    if (stop, stop_spilled) not in best or rank(entry) < rank(best[stop, stop_spilled]):
                        best[stop, stop_spilled] = entry
    if (n, False) not in best:
        return None
    _, peak, files, passes = best[n, False]
    return Plan(tuple(passes), peak, sum(p.flops for p in passes), spill_file_bytes=files)


def estimate_one_pass_bytes(geometry: Geometry) -> int:
    """Peak extra memory of the model's own forward on the whole volume (its output included).

    Models a plain GroupNorm -> SiLU -> Conv3d forward (norm and SiLU outputs both alive), which
    bounds the fused forward of ``medvae.models.blocks`` from above: measured peaks were 71-85% of
    this estimate on the CPU and 84-91% on an H200 (benchmarks/RESULTS.md).
    """
    full = geometry.full_bytes
    peak = 0
    current = 0  # bytes of the running tensor h
    block_input = 0
    norm_input = 0  # inside a block, conv2's caller still holds conv1's output
    for i, step in enumerate(geometry.steps):
        inside = i in geometry.block_of
        out = full(i + 1)
        if step.push_skip:
            block_input = current
        if isinstance(step, NormStep):
            held = block_input if (inside and not step.push_skip) else 0
            live = held + current + 2 * out  # group_norm output, then SiLU output
            norm_input = current if inside and not step.push_skip else 0
        elif isinstance(step, ConvStep):
            upsampled = 8 * current if step.upsample else 0
            workspace = geometry.conv_workspace(i, list(geometry.shapes[i + 1]))
            held = block_input if inside else 0
            live = held + norm_input + current + upsampled + out + workspace
            if step.closes:
                live = max(live, block_input + 3 * out)
                block_input = norm_input = 0
        elif isinstance(step, WholeStep):
            live = current + out + _whole_step_bytes(geometry, i)
        else:  # pointwise ops
            live = (block_input if inside else 0) + current + out
        if i == 0:
            live -= current  # T_0 is the caller's input
        peak = max(peak, live)
        current = out
    return geometry.with_margin(peak, ONE_PASS_SAFETY_FACTOR)


def plan_volume(geometry: Geometry, budget: float, allow_one_pass: bool = True, what: str = "plan_volume") -> Plan:
    """The fastest plan whose estimated peak fits ``budget`` bytes: the model's own forward if that
    fits (and ``allow_one_pass``), else the cheapest tiled plan (conv flops plus, where
    ``geometry.spill``, spill traffic). ValueError naming the minimum."""
    one_pass = estimate_one_pass_bytes(geometry)
    if allow_one_pass and one_pass <= budget:
        return Plan((), one_pass, 0.0, one_pass=True)
    plan = _search(geometry, budget)
    if plan is None:
        minimum = minimum_bytes(geometry)
        raise ValueError(
            f"{what}: memory_budget={int(budget)} bytes ({budget / 2**30:.3g} GiB) is too small for input "
            f"shape {(geometry.batch, geometry.channels[0], *geometry.shapes[0])}: the smallest plan needs "
            f"about {minimum} bytes ({minimum / 2**30:.3g} GiB), one pass about {one_pass / 2**30:.3g} GiB"
        )
    return plan


def minimum_bytes(geometry: Geometry) -> int:
    """Smallest estimated peak of any tiled plan (slow but streaming everything from the input)."""
    plan = _search(geometry, math.inf)
    assert plan is not None
    return plan.peak_bytes
