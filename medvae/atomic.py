"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything medvae writes (checkpoints, exports, volumes, tables) goes through here, so a crash or a
bad input mid-write never leaves a half-written result where a reader would take it for a good one.

Publishing a folder never deletes what medvae did not create: the finished folder is renamed onto
its final name only while that name is free (absent, or an empty folder, which rename(2) replaces
atomically). If something appeared there meanwhile, the finished folder is kept beside it under a
visible name and the error says where. A symlinked destination is followed: the output lands in the
folder the link points to and the link stays a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DestinationTakenError(FileExistsError):
    """The destination appeared (or filled) while the output was being written; nothing was replaced."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix (``.nii.gz`` stays ``.nii.gz``) so writers that pick
    the format from the suffix still work. A symlink at ``path`` is followed (its target is replaced).
    """
    final = follow_link(Path(path))
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def follow_link(path: Path) -> Path:
    """``path`` with a symlink at its last component resolved (so writes land in the link's target)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; publish it as ``path`` only if the block succeeds.

    ``replace=False`` (the default): ``path`` must be absent or an empty folder, before and at the
    end; if it is not, :class:`DestinationTakenError` says so and where the finished output was kept.
    ``replace=True`` is for folders medvae owns (a run's own ``export/``): the old folder is moved
    aside, the new one moved in, then the old one removed; a failed block leaves the old one intact.
    """
    final = follow_link(Path(path))
    final.parent.mkdir(parents=True, exist_ok=True)
    if not replace and _taken(final):
        raise DestinationTakenError(f"{final}: already exists and is not an empty folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(tmp)
    if replace and final.is_dir() and any(final.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)  # rename within the parent: atomic, old content kept
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)  # onto nothing or an empty folder; fails on anything else
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = _keep_beside(tmp, final)
        raise DestinationTakenError(
            f"{final}: appeared while medvae was writing; nothing there was touched, "
            f"the finished output is kept at {kept}"
        ) from None


def _taken(final: Path) -> bool:
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        return True
    return final.is_dir() and any(final.iterdir())


def _keep_beside(tmp: Path, final: Path) -> Path:
    """Rename the finished temporary folder to a free, visible name beside ``final``."""
    for n in range(1, 1000):
        candidate = final.with_name(f"{final.name}.medvae-{os.getpid()}-{n}")
        try:
            os.rename(tmp, candidate)  # fails if the candidate exists and is not empty
            return candidate
        except OSError:
            continue
    return tmp


def _fsync_dir(folder: Path) -> None:
    """Flush the files of a finished folder before it is published (a crash then leaves it whole)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
