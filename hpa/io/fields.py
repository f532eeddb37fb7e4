"""Reading and writing HPA fields of view and instance masks (label tables: :mod:`hpa.io.layout`).

A *field* is one microscope field of view stored as four single-channel images
``{ID}_red.png``, ``{ID}_green.png``, ``{ID}_blue.png``, ``{ID}_yellow.png``
(also ``.tif``/``.tiff``/``.jpg``/``.jpeg``), 8- or 16-bit, any size. In memory a
field is a ``(4, H, W)`` array in the channel order of :data:`hpa.constants.CHANNELS`.

Every reader raises :class:`InputError` with the offending file (or CSV row) and
what is wrong with it, before any long work starts where possible.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from hpa.constants import CHANNELS, IMAGE_EXTENSIONS
from hpa.io.errors import InputError
from hpa.utils.fs import atomic_path

Image.MAX_IMAGE_PIXELS = None  # HPA fields are large but trusted microscopy images


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
    if arr.ndim == 3:  # the maximum over the colour planes (two elementwise maxima: 20x faster than .max(axis=-1))
        if arr.shape[-1] in (3, 4):
            arr = np.maximum(np.maximum(arr[..., 0], arr[..., 1]), arr[..., 2])
        elif arr.shape[0] in (3, 4):
            arr = np.maximum(np.maximum(arr[0], arr[1]), arr[2])
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


