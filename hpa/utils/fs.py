"""Atomic file writes and small filesystem helpers (shards: :mod:`hpa.utils.shards`).

Every output of every stage goes through :func:`atomic_path` (or one of the
``write_*`` helpers built on it): the data are written to a temporary name in the
destination folder and renamed into place only when complete, so an interrupted
stage never leaves a half file that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps the destination's suffix so that libraries which pick a
    format from the extension (PIL, pandas, numpy) still work. On any exception the
    temporary file is removed and the destination is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(f"cannot create output folder {path.parent}", exc) from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:  # read-only folder, no space for even an empty file
        raise write_error(f"could not write {path}", exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise write_error(f"could not write {path}", exc) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_error(what: str, exc: OSError) -> OSError:
    """``OSError("{what}: {reason}")`` keeping ``exc``'s errno (``ENOSPC``, ``EACCES``, ...)."""
    err = OSError(f"{what}: {exc.strerror or exc}")
    err.errno = exc.errno
    return err


class NotEnoughSpace(OSError):
    """A cache or output that the disk cannot hold, found before any of it is written (errno ENOSPC)."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def gb(n_bytes: float) -> str:
    """A size in decimal units, as disks are sold: ``12.3 GB`` (from 0.1 GB), ``24.7 MB``, ``10.0 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= 0.1 * size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes / 1e3:.1f} kB"


def check_space(path: str | os.PathLike, need: int, what: str, hint: str = "") -> None:
    """Raise :class:`NotEnoughSpace` naming ``path`` when its disk has less than ``need`` bytes free.

    ``what`` says what needs them (``21,806 fields at 480 px``); ``hint`` what the user can do.
    """
    free = free_bytes(path)
    if need > free:
        err = NotEnoughSpace(f"{path}: {what} need {gb(need)} on disk, only {gb(free)} free there"
                             + (f"; {hint}" if hint else ""))
        err.errno = errno.ENOSPC
        raise err


def new_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype=None):
    """Create a ``.npy`` file of ``shape`` (uint8 by default) opened as a writable memmap, its
    disk space reserved up front.

    Writing into a memmap whose file has holes kills the process with SIGBUS when the disk
    fills up; reserving the space turns that into an ``OSError`` naming ``path`` and the size
    before any work. File systems that cannot reserve space are used as they are.
    """
    import numpy as np

    path = Path(path)
    dtype = np.dtype(np.uint8 if dtype is None else dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise write_error(f"could not create {path}", exc) from exc
    size = path.stat().st_size  # header + data
    if hasattr(os, "posix_fallocate") and arr.nbytes:
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                del arr
                path.unlink(missing_ok=True)
                raise write_error(f"could not reserve {size / 2**20:.1f} MiB for {path}", exc) from exc
    return arr


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_parquet(path: str | os.PathLike, df) -> Path:
    """Write a pandas DataFrame as Parquet (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


