"""Full-volume tensors kept in a temporary file instead of memory (the planner's spill files).

A ``SpillFile`` holds one (B, C, D, H, W) tensor in (B, D, H, W, C) order, so that a tile is a
few long reads: one per batch item when it spans H and W, one per D plane when it spans W, else
one per row. The file is created in the caller's folder and unlinked at once: it disappears when
closed or when the process dies, and no other file in that folder is touched. Its size is reserved
up front (``posix_fallocate`` where the OS has it), so a full disk fails before any work, with the
folder named.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

Interval = tuple[int, int]
PREFIX = "medvae-spill-"
MAX_CALL_BYTES = 1 << 30  # Linux moves at most ~2 GiB per read/write call


def check_free_space(directory: str | os.PathLike, nbytes: int) -> Path:
    """``directory`` as a Path if it exists and has ``nbytes`` free; else a one-line ValueError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: spill folder does not exist")
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise ValueError(
            f"{directory}: spill folder has {free / 2**30:.3g} GiB free, the plan needs {nbytes / 2**30:.3g} GiB"
        )
    return directory


class SpillFile:
    """One (B, C, D, H, W) tensor of ``dtype`` in an unlinked temporary file under ``directory``."""

    def __init__(self, directory: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(self.shape) * self.itemsize
        fd, path = tempfile.mkstemp(prefix=PREFIX, dir=directory)
        os.unlink(path)
        self.fd: int | None = fd
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            else:
                os.ftruncate(fd, nbytes)
        except OSError as err:
            self.close()
            raise ValueError(f"{directory}: cannot reserve {nbytes / 2**30:.3g} GiB for a spill file ({err.strerror})") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _runs(self, region: list[Interval]):
        """(file offset, bytes) of the contiguous pieces of ``region``, in (B, d, h, w, C) order."""
        b_n, c, d_n, h_n, w_n = self.shape
        (d0, d1), (h0, h1), (w0, w1) = region
        e = self.itemsize

        def offset(b, d, h, w):
            return (((b * d_n + d) * h_n + h) * w_n + w) * c * e

        for b in range(b_n):
            if (w0, w1) == (0, w_n) and (h0, h1) == (0, h_n):
                yield offset(b, d0, 0, 0), (d1 - d0) * h_n * w_n * c * e
                continue
            for d in range(d0, d1):
                if (w0, w1) == (0, w_n):
                    yield offset(b, d, h0, 0), (h1 - h0) * w_n * c * e
                    continue
                for h in range(h0, h1):
                    yield offset(b, d, h, w0), (w1 - w0) * c * e

    def _bytes(self, tensor: torch.Tensor) -> memoryview:
        return memoryview(tensor.view(-1).view(torch.uint8).numpy())

    def read(self, region: list[Interval]) -> torch.Tensor:
        """The tile ``region`` (per spatial axis [start, stop)) as a (B, C, d, h, w) CPU tensor in
        channels-last memory format."""
        edges = [b - a for a, b in region]
        buffer = torch.empty((self.shape[0], *edges, self.shape[1]), dtype=self.dtype)
        view, at = self._bytes(buffer), 0
        for offset, length in self._runs(region):
            done = 0
            while done < length:
                n = os.preadv(self.fd, [view[at + done: at + min(length, done + MAX_CALL_BYTES)]], offset + done)
                if n <= 0:
                    raise OSError(f"spill file: short read at byte {offset + done}")
                done += n
            at += length
        return buffer.permute(0, 4, 1, 2, 3)

    def write(self, region: list[Interval], tile: torch.Tensor) -> None:
        """Store the (B, C, d, h, w) ``tile`` (any memory format and device) at ``region``."""
        data = tile.detach().to("cpu", self.dtype).permute(0, 2, 3, 4, 1).contiguous()
        view, at = self._bytes(data), 0
        for offset, length in self._runs(region):
            done = 0
            while done < length:
                n = os.pwrite(self.fd, view[at + done: at + min(length, done + MAX_CALL_BYTES)], offset + done)
                if n <= 0:
                    raise OSError(f"spill file: short write at byte {offset + done}")
                done += n
            at += length
