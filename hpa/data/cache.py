"""The resized uint8 field cache, datasets over it, and normalisation statistics (folds: :mod:`hpa.data.splits`).

The cache: every field of a split is decoded ONCE, resized to ``S x S`` and stored as
uint8 in one memory-mapped ``.npy`` of shape ``(N, 4, S, S)`` (red, green, blue, yellow),
row ``i`` = ``ids[i]``. A sidecar ``.json`` records the IDs, the size and the source, so
a later stage (or a re-run) reuses the cache only when it holds exactly what it needs.
Building is atomic and resumable: rows are written into ``NAME.partial.npy`` with a
``NAME.done.npy`` row bitmap saved every few images; an interrupted build continues
where it stopped, and the complete file is renamed to ``NAME.npy`` at the end. Only the
images being decoded are ever held at full size in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hpa.constants import NUM_CLASSES
from hpa.io.errors import InputError
from hpa.io.fields import field_to_uint8, read_field
from hpa.utils.fs import atomic_path, check_space, gb, new_memmap, write_json
from hpa.utils.parallel import map_jobs

log = logging.getLogger(__name__)

#: Bumped whenever the bytes a cache row holds for a given field would change.
CACHE_VERSION = 2  # 2: 16-bit fields scaled by their own range, not their high byte


# --------------------------------------------------------------------------- cache
def cache_path(run: str | os.PathLike, split: str, size: int) -> Path:
    """Conventional location of a split's field cache: ``RUN/cache/{split}_{size}.npy``."""
    return Path(run) / "cache" / f"{split}_{int(size)}.npy"


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def _load_field(args) -> tuple[int, np.ndarray | None, str | None]:
    """Worker: read, resize and convert one field; returns (row, uint8 (4,S,S) or None, error)."""
    i, folder, image_id, size = args
    try:
        field = read_field(folder, image_id)
    except InputError as exc:
        return i, None, str(exc)
    return i, field_to_uint8(field, size), None


def build_field_cache(data_dir: str | os.PathLike, split: str, ids: Sequence[str], size: int,
                      out_path: str | os.PathLike, workers: int = 0, on_bad_image: str = "error",
                      flush_every: int = 32, progress: bool = True) -> np.memmap:
    """Decode every field of ``ids`` once into a uint8 ``(N, 4, S, S)`` memory map (or reuse it).

    Args:
        data_dir: data folder in the Kaggle layout; fields are read from ``data_dir/split/``.
        split: ``train`` or ``test`` (the sub-folder, recorded in the sidecar).
        ids: image IDs; row ``i`` of the cache is ``ids[i]``.
        size: side ``S`` in pixels; fields are resized to ``S x S`` (area interpolation when
            shrinking; non-square fields are squashed) and converted to uint8
            (:func:`hpa.io.fields.field_to_uint8`: 8-bit as it is, 16-bit by the field's own range).
        out_path: the ``.npy`` to create, e.g. :func:`cache_path`; a sidecar ``.json`` goes beside it.
        workers: decoding processes (0: in this process).
        on_bad_image: ``error``: an unreadable field stops the build with its file name;
            ``skip``: its row stays zero and its ID is listed in the sidecar's ``bad_ids``
            (see :func:`cache_bad_ids`).
    Before a new cache is filled its size is logged, and a disk without room for it stops the build
    (:class:`hpa.utils.fs.NotEnoughSpace`, naming the folder, the size and what is free).
        flush_every: rows between progress saves of an interrupted build.
        progress: show a tqdm bar while decoding.
    Returns:
        the cache opened read-only, ``np.memmap`` uint8 ``(N, 4, S, S)``.
    """
    ids = [str(i) for i in ids]
    size = int(size)
    if size < 16:
        raise ValueError(f"cache size must be >= 16 px, got {size}")
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    out_path = Path(out_path)
    if out_path.suffix != ".npy":
        raise ValueError(f"cache path must end in .npy, got {out_path}")
    folder = Path(data_dir) / split
    meta = {"version": CACHE_VERSION, "split": split, "size": size, "n": len(ids), "ids_sha1": _ids_digest(ids),
            "source": str(Path(data_dir).resolve() / split)}
    side = out_path.with_suffix(".json")
    partial = out_path.with_name(out_path.stem + ".partial.npy")
    done_path = out_path.with_name(out_path.stem + ".done.npy")
    bad_path = partial.with_name(out_path.stem + ".bad.json")  # bad images found before an interruption
    if out_path.is_file() and side.is_file():
        old = json.loads(side.read_text())
        if all(old.get(k) == v for k, v in meta.items() if k != "source"):
            log.info("reusing field cache %s (%d x 4 x %d x %d)", out_path, len(ids), size, size)
            if not partial.is_file() and partial.with_suffix(".json").is_file():
                # this build's own files, left by an interruption between its last two steps
                for p in (done_path, partial.with_suffix(".json"), bad_path):
                    p.unlink(missing_ok=True)
            return np.load(out_path, mmap_mode="r")
        log.warning("field cache %s holds other images or another size; rebuilding it", out_path)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist")

    shape = (len(ids), 4, size, size)
    done = None
    if partial.is_file() and done_path.is_file() and partial.with_suffix(".json").is_file():
        if json.loads(partial.with_suffix(".json").read_text()) == meta:
            arr = np.lib.format.open_memmap(partial, mode="r+")
            done = np.load(done_path)
            if arr.shape != shape or done.shape != (len(ids),):
                done = None
    if done is None:
        need = int(np.prod(shape)) + 128  # uint8 rows + the .npy header
        log.info("field cache %s: %d fields x 4 channels x %d x %d px = %s on disk", out_path, len(ids), size, size,
                 gb(need))
        check_space(partial.parent, need, f"{len(ids):,} fields at {size} px",
                    "free some space, put the run on a larger disk (--run), or lower image_model.cell_px or the "
                    "maximum of image_model.image_size_range")
        arr = new_memmap(partial, shape)  # disk space reserved: a full disk fails here, naming the file
        done = np.zeros(len(ids), bool)
        write_json(partial.with_suffix(".json"), meta)
    else:
        log.info("resuming field cache %s: %d of %d fields done", out_path, int(done.sum()), len(ids))

    bad: dict[str, str] = json.loads(bad_path.read_text()) if bad_path.is_file() and done.any() else {}

    def save_progress():
        arr.flush()
        if bad:
            write_json(bad_path, bad)
        with atomic_path(done_path) as tmp:
            np.save(tmp, done)

    todo = [(i, str(folder), ids[i], size) for i in np.flatnonzero(~done)]
    if todo:
        log.info("decoding %d fields of %s into %s (%d px, %d workers)", len(todo), folder, out_path, size, workers)
    results = map_jobs(_load_field, todo, workers, desc=f"cache {split}", ordered=False, progress=progress)
    try:
        for n, (i, field, err) in enumerate(results, 1):
            if err is not None:
                if on_bad_image == "error":
                    raise InputError(err + " (set on_bad_image=skip to leave such images out)")
                bad[ids[i]] = err
                arr[i] = 0
            else:
                arr[i] = field
            done[i] = True
            if n % flush_every == 0:
                save_progress()
    finally:
        results.close()  # stops the pool at once when the loop ends early (an error, an interrupt)
        save_progress()
    arr = None  # the memory map is released before the file is renamed
    os.replace(partial, out_path)
    write_json(side, {**meta, "ids": ids, "bad_ids": bad})
    for p in (done_path, partial.with_suffix(".json"), bad_path):
        p.unlink(missing_ok=True)
    return np.load(out_path, mmap_mode="r")


def read_cache_rows(cache: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """Rows of a field cache as a new uint8 array ``(len(rows), 4, S, S)``.

    For a cache opened as a memory map (:func:`build_field_cache`) the rows are read with plain
    file reads: indexing the map instead leaves every row read mapped in the process, whose
    resident size then grows by ``4 x S x S`` bytes per field over a pass through a split
    (1 MiB per field at 512 px). Read this way the bytes pass through the OS page cache only,
    and a per-image loop keeps a flat peak memory. Any other array is indexed as usual.
    """
    rows = [int(r) for r in rows]
    if not isinstance(cache, np.memmap) or cache.filename is None or not cache.flags.c_contiguous:
        return np.ascontiguousarray(cache[rows])
    bad = [r for r in rows if not 0 <= r < len(cache)]
    if bad:
        raise IndexError(f"{cache.filename}: rows {bad[:5]} outside 0..{len(cache) - 1}")
    out = np.empty((len(rows),) + cache.shape[1:], cache.dtype)
    row_bytes = out[0].nbytes if rows else 0
    fd = os.open(cache.filename, os.O_RDONLY)
    try:
        for k, r in enumerate(rows):
            buf = os.pread(fd, row_bytes, cache.offset + r * row_bytes)
            if len(buf) != row_bytes:
                raise InputError(f"{cache.filename}: file ends inside row {r} (truncated cache? delete it to rebuild)")
            out[k] = np.frombuffer(buf, cache.dtype).reshape(cache.shape[1:])
    finally:
        os.close(fd)
    return out


def cache_bad_ids(out_path: str | os.PathLike) -> dict[str, str]:
    """``{ID: reason}`` of fields a cache build skipped (``on_bad_image=skip``); rows are zero."""
    side = Path(out_path).with_suffix(".json")
    if not side.is_file():
        return {}
    return dict(json.loads(side.read_text()).get("bad_ids", {}))


# --------------------------------------------------------------------------- statistics
def channel_stats(cache: np.ndarray, rows: Sequence[int] | None = None, chunk: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, S, S)`` fields, scaled to [0, 1].

    Computed in float64 over ``rows`` (default: all) in chunks, so a memmap is never read
    whole. Returns two lists of C floats; std is floored at 1e-3 (a blank channel).
    """
    if cache.ndim != 4:
        raise ValueError(f"expected a (N, C, S, S) cache, got shape {cache.shape}")
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, np.int64)
    if rows.size == 0:
        raise ValueError("no rows to compute channel statistics from")
    c = cache.shape[1]
    s1, s2, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(rows), chunk):
        x = np.asarray(cache[np.sort(rows[start:start + chunk])], np.float64) / 255.0
        s1 += x.sum(axis=(0, 2, 3))
        s2 += (x * x).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]


# --------------------------------------------------------------------------- datasets
class FieldDataset(torch.utils.data.Dataset):
    """Rows of a field cache with their targets.

    Item ``i``: ``(x, t)``: ``x`` uint8 tensor ``(4, S, S)`` (raw cache row ``rows[i]``; the
    training loop scales, augments and normalises it on the device), ``t`` float32 ``(C,)``
    targets (zeros when ``targets`` is None).

    ``cache`` is a memmap/array or the path of the ``.npy``; a path is opened lazily in
    each DataLoader worker, so workers share the page cache instead of copying the data.
    """

    def __init__(self, cache: np.ndarray | str | os.PathLike, rows: Sequence[int] | None = None,
                 targets: np.ndarray | None = None):
        self._path = None if isinstance(cache, np.ndarray) else str(cache)
        self._cache = cache if isinstance(cache, np.ndarray) else None
        if self._path is not None and not Path(self._path).is_file():
            raise InputError(f"field cache {self._path} not found")
        n = len(self.cache)
        self.rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
            raise IndexError(f"rows must lie in 0..{n - 1}, got {self.rows.min()}..{self.rows.max()}")
        if self.cache.ndim != 4 or self.cache.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (N, C, S, S) cache, got {self.cache.dtype} {self.cache.shape}")
        if targets is not None:
            targets = np.asarray(targets, np.float32)
            if targets.ndim != 2 or len(targets) != len(self.rows):
                raise ValueError(f"targets must be ({len(self.rows)}, C), got {targets.shape}")
            self.targets = torch.from_numpy(targets)
        else:
            self.targets = torch.zeros(len(self.rows), NUM_CLASSES)

    @property
    def cache(self) -> np.ndarray:
        if self._cache is None:
            self._cache = np.load(self._path, mmap_mode="r")
        return self._cache

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._path is not None:
            state["_cache"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.cache[self.rows[i]])), self.targets[i]
