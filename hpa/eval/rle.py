"""Cell masks as strings, the way the Kaggle HPA Single Cell competition wants them.

A binary mask ``(H, W)`` is run-length encoded by pycocotools (column-major, i.e.
Fortran order; the counts alternate background / foreground and start with
background), the COCO ``counts`` bytes are compressed with zlib (level 9) and the
result is written as ASCII base64::

    base64(zlib(coco_rle(np.asfortranarray(mask.astype(np.uint8)))["counts"]))

The string does not carry the image size: a decoder needs ``height`` and ``width``
and checks that the runs cover exactly ``height * width`` pixels.

Decoding validates the COCO counts string in numpy before pycocotools sees it
(pycocotools' C parser trusts its input and can read or write out of bounds on
a malformed one), for many strings at once: :func:`decode_rles` turns a list of
strings into validated COCO RLE objects that :mod:`pycocotools.mask` functions
(``decode``, ``iou``, ``area``) accept.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_util

ZLIB_LEVEL = 9  # the level of the competition's own encoder (Z_BEST_COMPRESSION)
_MAX_CHARS_PER_COUNT = 7  # 35 bits: enough for any run of an image below 2**32 pixels


class RLEError(ValueError):
    """A mask string that cannot be decoded; ``index`` is its position in the batch."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


# --------------------------------------------------------------------------- encode
def _check_binary(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D binary mask (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"expected a bool or 0/1 mask, got dtype {mask.dtype}")
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise ValueError(
            f"expected a bool or 0/1 mask, got values {mask.min()}..{mask.max()} "
            "(for an instance label image use encode_instances)"
        )
    return mask != 0


def _to_string(counts_bytes: bytes) -> str:
    return base64.b64encode(zlib.compress(counts_bytes, ZLIB_LEVEL)).decode("ascii")


def encode_mask(mask: np.ndarray) -> str:
    """Encode one binary mask ``(H, W)`` (bool, or integers/floats that are 0 or 1) as a string.

    Identical to the competition's ``encode_binary_mask``: COCO RLE of the Fortran-ordered
    uint8 mask -> zlib (level 9) -> base64, returned as ``str``.
    """
    mask = _check_binary(mask)
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return _to_string(rle["counts"])


def _check_label_image(label_img) -> np.ndarray:
    lab = np.asarray(label_img)
    if lab.ndim != 2:
        raise ValueError(f"expected a 2-D instance label image (H, W), got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == np.bool_):
        raise ValueError(f"expected an integer instance label image, got dtype {lab.dtype}")
    if lab.size == 0:
        raise ValueError(f"empty label image of shape {lab.shape}")
    if lab.size >= 2**32:
        raise ValueError(f"image of {lab.size} pixels is too large for COCO RLE (limit 2**32)")
    return lab


def instance_counts(label_img: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Uncompressed COCO RLE counts of every instance of a label image, in one pass.

    Args:
        label_img: integer ``(H, W)``, 0 = background, other values = instance ids (>= 0).
    Returns:
        ``(ids, counts)``: sorted int64 instance ids (background excluded) and, per id, the
        int64 run lengths (background first, Fortran order) that pycocotools would produce
        for ``label_img == id``.
    """
    lab = _check_label_image(label_img)
    h, w = lab.shape
    n = h * w
    flat = _fortran_ravel(lab)
    if flat.min() < 0:
        raise ValueError(f"instance ids must be >= 0, got {flat.min()}")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    seg_start = np.concatenate([[0], change])
    seg_end = np.concatenate([change, [n]])
    seg_lab = flat[seg_start]
    fg = seg_lab != 0
    order = np.argsort(seg_lab[fg], kind="stable")  # by label, runs keep their image order
    s = seg_start[fg][order]
    e = seg_end[fg][order]
    lab_sorted = seg_lab[fg][order]
    ids, first, nseg = np.unique(lab_sorted, return_index=True, return_counts=True)
    prev_end = np.empty_like(e)
    prev_end[1:] = e[:-1]
    prev_end[first] = 0
    pairs = np.stack([s - prev_end, e - s], axis=1).ravel()  # (zeros, ones) per run
    counts = []
    for f, k in zip(first.tolist(), nseg.tolist()):
        c = pairs[2 * f : 2 * (f + k)]
        tail = n - int(e[f + k - 1])
        counts.append(np.append(c, tail) if tail else c)
    return ids.astype(np.int64), counts


def _fortran_ravel(lab: np.ndarray) -> np.ndarray:
    """``lab.ravel(order="F")``; OpenCV's transpose for 8/16/32-bit labels (about 4x faster than numpy's)."""
    if lab.dtype in (np.uint8, np.uint16, np.int16, np.int32) and lab.flags.c_contiguous:
        import cv2

        return cv2.transpose(lab).ravel()
    return lab.ravel(order="F")


def counts_to_rles(counts: Sequence[np.ndarray], height: int, width: int) -> list[dict]:
    """COCO RLE objects (``{"size": [H, W], "counts": bytes}``) from uncompressed run lengths."""
    if not len(counts):
        return []
    return mask_util.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)


def instance_rles(label_img: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """``(ids, rles)``: COCO RLE object of every instance of a label image (see :func:`instance_counts`)."""
    ids, counts = instance_counts(label_img)
    h, w = np.shape(label_img)
    return ids, counts_to_rles(counts, h, w)


def encode_instances(label_img: np.ndarray) -> dict[int, str]:
    """Encode every instance of an integer label image ``(H, W)`` at once.

    Returns ``{cell_id: string}`` for every id present (background 0 excluded), each string
    equal to ``encode_mask(label_img == cell_id)``. Works on the image's runs (one pass over
    the pixels), not one full-image pass per cell.
    """
    ids, rles = instance_rles(label_img)
    return {int(i): _to_string(r["counts"]) for i, r in zip(ids.tolist(), rles)}


# --------------------------------------------------------------------------- decode
def _parse_coco_counts(chunks: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Parse COCO compressed counts strings (pycocotools ``rleFrString``) in numpy.

    Returns ``(counts, bounds)``: all run lengths (int64, concatenated) and offsets
    ``(n + 1,)`` so that string i's runs are ``counts[bounds[i]:bounds[i+1]]``.
    Raises :class:`RLEError` (with the string's index) for a malformed string.
    """
    n = len(chunks)
    lens = np.fromiter(map(len, chunks), np.int64, n)
    if (lens == 0).any():
        raise RLEError("empty RLE counts", int(np.argmax(lens == 0)))
    str_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    v = np.frombuffer(b"".join(chunks), np.uint8).astype(np.int64) - 48

    def owner(pos):
        return int(np.searchsorted(str_start, pos, side="right") - 1)

    bad = (v < 0) | (v > 63)
    if bad.any():
        p = int(np.argmax(bad))
        raise RLEError(f"not a COCO RLE string (character {chr(v[p] + 48)!r} outside '0'..'o')", owner(p))
    ends = (v & 0x20) == 0  # a character without the continuation bit ends a number
    trunc = ~ends[str_start + lens - 1]
    if trunc.any():
        raise RLEError("not a COCO RLE string (truncated: ends inside a number)", int(np.argmax(trunc)))
    num_end = np.flatnonzero(ends)
    num_start = np.concatenate([[0], num_end[:-1] + 1])
    nlen = num_end - num_start + 1
    if (nlen > _MAX_CHARS_PER_COUNT).any():
        raise RLEError("not a COCO RLE string (a run length is too long)", owner(num_start[np.argmax(nlen > _MAX_CHARS_PER_COUNT)]))
    pos = np.arange(v.size) - np.repeat(num_start, nlen)
    vals = np.add.reduceat((v & 0x1F) << (5 * pos), num_start)
    neg = (v[num_end] & 0x10) != 0  # sign bit of the last 5-bit group
    vals = vals - (neg.astype(np.int64) << (5 * nlen))
    num_str = np.searchsorted(str_start, num_start, side="right") - 1
    bounds = np.concatenate([[0], np.cumsum(np.bincount(num_str, minlength=n))])
    m = np.arange(vals.size) - bounds[num_str]  # index of the run within its string
    # counts[m] = vals[m] + counts[m - 2] for m > 2: a cumulative sum per (string, parity),
    # where run 0 stands alone and run 2 starts the even chain.
    key = num_str * 2 + (m & 1)
    order = np.argsort(key, kind="stable")
    sv = np.where(m == 0, 0, vals)[order]
    cs = np.cumsum(sv)
    k_sorted = key[order]
    grp_first = np.concatenate([[True], k_sorted[1:] != k_sorted[:-1]])
    base = (cs - sv)[grp_first]
    cs = cs - np.repeat(base, np.diff(np.append(np.flatnonzero(grp_first), cs.size)))
    counts = np.empty_like(vals)
    counts[order] = cs
    counts[m == 0] = vals[m == 0]
    if (counts < 0).any():
        raise RLEError("not a valid RLE (negative run length)", int(num_str[np.argmax(counts < 0)]))
    return counts, bounds


def _unwrap(s) -> bytes:
    """base64 text -> zlib-decompressed COCO counts bytes; raises ValueError saying which step failed."""
    if isinstance(s, str):
        try:
            s = s.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("not base64 (non-ASCII characters)") from None
    elif not isinstance(s, (bytes, bytearray)):
        raise ValueError(f"expected a base64 string, got {type(s).__name__}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    try:
        return zlib.decompress(raw)
    except zlib.error:
        raise ValueError("not zlib-compressed data") from None


def decode_rles(strings: Sequence[str], height: int, width: int) -> list[dict]:
    """Validate mask strings of one ``height x width`` image and return COCO RLE objects.

    The objects (``{"size": [H, W], "counts": bytes}``) feed ``pycocotools.mask.decode``,
    ``iou`` and ``area`` without touching pixels. Raises :class:`RLEError` (a ValueError) whose
    ``index`` is the bad string's position, for text that is not base64, zlib or a COCO RLE
    string, or runs that do not cover exactly ``height * width`` pixels.
    """
    height, width = _check_size(height, width)
    if not len(strings):
        return []
    chunks = []
    for i, s in enumerate(strings):
        try:
            chunks.append(_unwrap(s))
        except ValueError as exc:
            raise RLEError(str(exc), i) from None
    counts, bounds = _parse_coco_counts(chunks)
    totals = np.add.reduceat(counts, bounds[:-1])
    wrong = totals != height * width
    if wrong.any():
        i = int(np.argmax(wrong))
        raise RLEError(
            f"RLE covers {int(totals[i])} pixels but the image is {height} x {width} = {height * width} pixels", i
        )
    per = [counts[bounds[i] : bounds[i + 1]] for i in range(len(chunks))]
    return counts_to_rles(per, height, width)


def _check_size(height, width) -> tuple[int, int]:
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise ValueError(f"image size must be integers, got height={height!r} width={width!r}") from None
    if h != height or w != width or h < 1 or w < 1:
        raise ValueError(f"image size must be positive integers, got height={height!r} width={width!r}")
    if h * w >= 2**32:
        raise ValueError(f"image of {h} x {w} pixels is too large for COCO RLE (limit 2**32)")
    return h, w


def decode_mask(s: str, height: int, width: int) -> np.ndarray:
    """Decode one mask string into a bool ``(height, width)`` mask (inverse of :func:`encode_mask`).

    Raises ValueError for a string that is not base64 / zlib / COCO RLE, or whose runs do not
    cover exactly ``height * width`` pixels.
    """
    rle = decode_rles([s], height, width)[0]
    return rle_to_mask(rle)


def rle_to_mask(rle: dict) -> np.ndarray:
    """A COCO RLE object from :func:`decode_rles` as a bool ``(H, W)`` C-contiguous mask."""
    h, w = rle["size"]
    counts, _ = _parse_coco_counts([rle["counts"]])
    flat = np.repeat(np.arange(counts.size) % 2 == 1, counts)  # runs alternate background / foreground
    return np.ascontiguousarray(flat.reshape(w, h).T)
