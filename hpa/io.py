"""Reading HPA fields of view, label tables and instance masks.

A *field* is one microscope field of view stored as four single-channel images
``{ID}_red.png``, ``{ID}_green.png``, ``{ID}_blue.png``, ``{ID}_yellow.png``
(also ``.tif``/``.tiff``/``.jpg``/``.jpeg``), 8- or 16-bit, any size. In memory a
field is a ``(4, H, W)`` array in the channel order of :data:`hpa.constants.CHANNELS`.

Every reader raises :class:`InputError` with the offending file (or CSV row) and
what is wrong with it, before any long work starts where possible.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from .constants import CHANNELS, IMAGE_EXTENSIONS, NUM_CLASSES
from .fsutil import atomic_path

Image.MAX_IMAGE_PIXELS = None  # HPA fields are large but trusted microscopy images


class InputError(ValueError):
    """Bad input data: the message names the file or row and says what is wrong."""


# --------------------------------------------------------------------------- fields
def channel_paths(folder: str | os.PathLike, image_id: str) -> list[Path]:
    """Paths of the four channel files of ``image_id`` in ``folder`` (red, green, blue, yellow).

    Raises :class:`InputError` listing every channel that has no file.
    """
    folder = Path(folder)
    found, missing = [], []
    for ch in CHANNELS:
        for ext in IMAGE_EXTENSIONS:
            p = folder / f"{image_id}_{ch}{ext}"
            if p.is_file():
                found.append(p)
                break
        else:
            missing.append(ch)
    if missing:
        exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise InputError(
            f"image {image_id!r} in {folder}: missing channel file(s) "
            + ", ".join(f"{image_id}_{ch}.{{{exts}}}" for ch in missing)
        )
    return found


def read_channel(path: str | os.PathLike) -> np.ndarray:
    """Read one channel image as a 2-D uint8 or uint16 array.

    Colour files (the HPA website's JPEGs show each channel in its own colour) are
    reduced to one channel by the maximum over colour planes. Raises
    :class:`InputError` for unreadable, truncated or unsupported files.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as exc:  # PIL/tifffile raise many types for corrupt files
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4):
            arr = arr[..., :3].max(axis=-1)
        elif arr.shape[0] in (3, 4):
            arr = arr[:3].max(axis=0)
        else:
            raise InputError(f"{path}: expected a single-channel image, got shape {arr.shape}")
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype in (np.int32, np.uint32, np.int16):  # PIL 'I' mode for 16-bit PNGs
        if arr.min() < 0 or arr.max() > 65535:
            raise InputError(f"{path}: pixel values outside 0..65535")
        arr = arr.astype(np.uint16)
    elif arr.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"{path}: floating-point images are not supported, save as 8- or 16-bit")
        raise InputError(f"{path}: unsupported pixel type {arr.dtype}")
    return np.ascontiguousarray(arr)


def read_field(folder: str | os.PathLike, image_id: str) -> np.ndarray:
    """Read a field as a ``(4, H, W)`` uint8 or uint16 array (red, green, blue, yellow).

    If some channels are 16-bit and others 8-bit, the 8-bit ones are scaled to 16 bit
    (x257) so that all four share one range. Raises :class:`InputError` naming the file
    when a channel is missing or unreadable, or when channel sizes differ.
    """
    paths = channel_paths(folder, image_id)
    chans = [read_channel(p) for p in paths]
    shapes = {c.shape for c in chans}
    if len(shapes) != 1:
        detail = ", ".join(f"{p.name} {c.shape[1]}x{c.shape[0]}" for p, c in zip(paths, chans))
        raise InputError(f"image {image_id!r} in {folder}: channels differ in size ({detail})")
    if any(c.dtype == np.uint16 for c in chans):
        chans = [c if c.dtype == np.uint16 else c.astype(np.uint16) * 257 for c in chans]
    return np.stack(chans)


def field_size(folder: str | os.PathLike, image_id: str) -> tuple[int, int]:
    """``(H, W)`` of a field from the headers of its channel files, without decoding pixels.

    For an image that cannot be decoded (a truncated file, a missing channel): the first
    channel file whose header reads gives the size. Raises :class:`InputError` when none does.
    """
    folder = Path(folder)
    errors = []
    for ch in CHANNELS:
        for ext in IMAGE_EXTENSIONS:
            p = folder / f"{image_id}_{ch}{ext}"
            if not p.is_file():
                continue
            try:
                if ext in (".tif", ".tiff"):
                    import tifffile

                    with tifffile.TiffFile(p) as tif:
                        shape = tif.pages[0].shape
                    return (shape[0], shape[1]) if len(shape) == 2 or shape[-1] in (3, 4) else (shape[1], shape[2])
                with Image.open(p) as im:
                    return im.size[1], im.size[0]
            except Exception as exc:  # collected: the error below lists every file tried
                errors.append(f"{p.name} ({type(exc).__name__}: {exc})")
    raise InputError(f"image {image_id!r} in {folder}: no channel file with a readable header"
                     + (": " + "; ".join(errors) if errors else ""))


def to_float(field: np.ndarray) -> np.ndarray:
    """Scale a uint8/uint16 array to float32 in [0, 1] by its bit depth."""
    if field.dtype == np.uint8:
        return field.astype(np.float32) / 255.0
    if field.dtype == np.uint16:
        return field.astype(np.float32) / 65535.0
    if np.issubdtype(field.dtype, np.floating):
        return field.astype(np.float32, copy=False)
    raise TypeError(f"expected uint8, uint16 or float array, got {field.dtype}")


def read_field_float(folder: str | os.PathLike, image_id: str) -> np.ndarray:
    """:func:`read_field` scaled to float32 ``(4, H, W)`` in [0, 1]."""
    return to_float(read_field(folder, image_id))


def to_uint8(field: np.ndarray) -> np.ndarray:
    """Convert a uint8/uint16/float-in-[0,1] array to uint8 by bit depth."""
    if field.dtype == np.uint8:
        return field
    if field.dtype == np.uint16:
        return (field >> 8).astype(np.uint8)
    return np.clip(np.rint(to_float(field) * 255.0), 0, 255).astype(np.uint8)


def resize_field(field: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a ``(C, H, W)`` field to ``size`` (an int for square, or ``(H, W)``).

    Area interpolation when shrinking, bilinear when enlarging; dtype is kept.
    """
    if field.ndim != 3:
        raise ValueError(f"expected a (C, H, W) field, got shape {field.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    c, h, w = field.shape
    if (h, w) == (out_h, out_w):
        return field.copy()
    interp = cv2.INTER_AREA if out_h * out_w < h * w else cv2.INTER_LINEAR
    src = field
    if field.dtype not in (np.uint8, np.uint16, np.float32):
        src = field.astype(np.float32)
    out = np.stack([cv2.resize(ch, (out_w, out_h), interpolation=interp) for ch in src])
    return out.astype(field.dtype, copy=False)


def rgb_composite(field: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """An (H, W, 3) uint8 RGB view of a field for display.

    HPA convention: microtubules red, protein green, nucleus blue, ER yellow (added to
    red and green). Each channel is stretched to its ``percentile`` brightness.
    """
    f = to_float(field)
    out = np.zeros(f.shape[1:] + (3,), np.float32)
    scaled = []
    for ch in f:
        hi = float(np.percentile(ch, percentile)) or 1.0
        scaled.append(np.clip(ch / hi, 0, 1))
    r, g, b, y = scaled
    out[..., 0] = np.clip(r + 0.5 * y, 0, 1)
    out[..., 1] = np.clip(g + 0.5 * y, 0, 1)
    out[..., 2] = b
    return (out * 255).astype(np.uint8)


# --------------------------------------------------------------------------- masks
def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read an instance mask PNG (0 = background, 1..K = objects) as int32 (H, W)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise InputError(f"{path}: mask file not found") from None
    except Exception as exc:
        raise InputError(f"{path}: cannot read mask ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:  # some tools save labels in RGB; HPA's own masks are single-channel
        arr = arr[..., 0].astype(np.int32) + (arr[..., 1].astype(np.int32) << 8) + (arr[..., 2].astype(np.int32) << 16)
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2-D instance mask, got shape {arr.shape}")
    return arr.astype(np.int32)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write an instance mask as a 16-bit PNG atomically (labels must be < 65536)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D instance mask, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise ValueError(f"{path}: instance labels must lie in 0..65535, got {mask.min()}..{mask.max()}")
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), mask.astype(np.uint16)):
            raise OSError("OpenCV could not encode or write the PNG")  # atomic_path names the file
    return Path(path)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8/uint16 grey (H, W) or RGB (H, W, 3) image as PNG atomically."""
    image = np.asarray(image)
    with atomic_path(path) as tmp:
        arr = image[..., ::-1] if image.ndim == 3 else image  # OpenCV wants BGR
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(arr)):
            raise OSError("OpenCV could not encode or write the PNG")  # atomic_path names the file
    return Path(path)


def write_field(folder: str | os.PathLike, image_id: str, field: np.ndarray, ext: str = ".png") -> list[Path]:
    """Write a (4, H, W) uint8/uint16 field as four channel files."""
    if field.ndim != 3 or field.shape[0] != len(CHANNELS):
        raise ValueError(f"expected a (4, H, W) field, got shape {field.shape}")
    return [write_png(Path(folder) / f"{image_id}_{ch}{ext}", field[i]) for i, ch in enumerate(CHANNELS)]


# --------------------------------------------------------------------------- labels
def parse_label_string(text, where: str) -> list[int]:
    """Parse ``"0|5|16"`` into ``[0, 5, 16]``; ``where`` names the file and row for errors."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        raise InputError(f"{where}: empty Label")
    if isinstance(text, (int, np.integer)):
        parts = [str(int(text))]
    else:
        parts = str(text).strip().split("|")
    labels = []
    for p in parts:
        p = p.strip()
        if not p.lstrip("-").isdigit():
            raise InputError(f"{where}: Label {text!r} is not a '|'-separated list of class numbers")
        c = int(p)
        if not 0 <= c < NUM_CLASSES:
            raise InputError(f"{where}: class {c} outside 0..{NUM_CLASSES - 1} in Label {text!r}")
        labels.append(c)
    return sorted(set(labels))


def read_labels(csv_path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a Kaggle ``train.csv`` (``ID,Label``) into ``(ids, multi_hot)``.

    ``multi_hot`` is uint8 ``(N, 19)``. Raises :class:`InputError` naming the file and
    row for missing columns, malformed labels, classes outside 0..18 and duplicate IDs.
    """
    csv_path = Path(csv_path)
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{csv_path}: labels file not found") from None
    except Exception as exc:
        raise InputError(f"{csv_path}: cannot parse CSV ({exc})") from None
    missing = [c for c in ("ID", "Label") if c not in df.columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {missing}; found {list(df.columns)}")
    ids = [s.strip() for s in df["ID"]]
    y = np.zeros((len(df), NUM_CLASSES), np.uint8)
    seen: dict[str, int] = {}
    for i, (image_id, label) in enumerate(zip(ids, df["Label"])):
        where = f"{csv_path} row {i + 2}"  # +1 header, +1 one-based
        if not image_id:
            raise InputError(f"{where}: empty ID")
        if image_id in seen:
            raise InputError(f"{where}: duplicate ID {image_id!r} (first at row {seen[image_id] + 2})")
        seen[image_id] = i
        if label == "":
            raise InputError(f"{where}: empty Label for ID {image_id!r}")
        y[i, parse_label_string(label, where)] = 1
    return ids, y


def read_ids(csv_path: str | os.PathLike) -> list[str]:
    """IDs of a ``test.csv`` / ``sample_submission.csv`` (column ``ID``), checked for duplicates."""
    csv_path = Path(csv_path)
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{csv_path}: file not found") from None
    if "ID" not in df.columns:
        raise InputError(f"{csv_path}: missing column 'ID'; found {list(df.columns)}")
    ids = [s.strip() for s in df["ID"]]
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise InputError(f"{csv_path} row {int(dup.index[0]) + 2}: duplicate ID {dup.iloc[0]!r}")
    return ids


def list_split(data_dir: str | os.PathLike, split: str) -> tuple[list[str], np.ndarray | None]:
    """IDs (and multi-hot labels for ``train``) of a split of a Kaggle-layout data folder.

    ``train``: ``DATA/train.csv``. ``test``: ``DATA/test.csv``, else
    ``DATA/sample_submission.csv``, else every ``*_red.*`` file in ``DATA/test/``.
    Labels are ``None`` for the test split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data folder {data_dir} does not exist")
    if split == "train":
        return read_labels(data_dir / "train.csv")
    if split != "test":
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    for name in ("test.csv", "sample_submission.csv"):
        if (data_dir / name).is_file():
            return read_ids(data_dir / name), None
    folder = data_dir / "test"
    if not folder.is_dir():
        raise InputError(f"{data_dir}: no test.csv, sample_submission.csv or test/ folder")
    ids = sorted({p.name[: -len(p.name.split("_red")[-1]) - 4] for p in folder.glob("*_red.*")})
    return ids, None


def check_images_exist(folder: str | os.PathLike, ids: list[str]) -> None:
    """Raise :class:`InputError` listing IDs whose channel files are missing (checked up front)."""
    bad = []
    for image_id in ids:
        try:
            channel_paths(folder, image_id)
        except InputError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise InputError(f"{len(bad)} of {len(ids)} images lack channel files in {folder}:\n  " + "\n  ".join(bad[:5]) + more)


def usable_images(folder: str | os.PathLike, ids: list[str], on_bad_image: str = "error") -> tuple[list[str], dict[str, str]]:
    """Check channel files up front: ``error`` raises (see :func:`check_images_exist`);
    ``skip`` returns ``(ids that have all four files, {bad id: reason})``."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if on_bad_image == "error":
        check_images_exist(folder, ids)
        return list(ids), {}
    bad = {}
    for image_id in ids:
        try:
            channel_paths(folder, image_id)
        except InputError as exc:
            bad[image_id] = str(exc)
    return [i for i in ids if i not in bad], bad
