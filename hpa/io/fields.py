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


#: The percentile of a 16-bit field's pixels (its four channels pooled) that becomes the top grey level.
SCALE_PERCENTILE = 99.99


def field_scale(field: np.ndarray, percentile: float = SCALE_PERCENTILE) -> float:
    """The raw value that maps to full brightness (1.0, uint8 255) for this field: its own range.

    - uint8: 255 (8-bit fields are used as they are);
    - uint16: the ``percentile`` of all pixels of all channels pooled, clipped to 255..65535;
    - float: 1.0.

    Why one number per field, from the channels pooled: a 16-bit field is often dim (a 12-bit
    camera, a short exposure: values 0..4000 of 65535), and keeping only the high byte leaves
    it 16 grey levels. Stretching by the field's own bright level restores them. The same
    factor divides all four channels, so their brightness relative to each other is kept: a
    dim protein (green) channel next to bright reference stains means weak or no staining
    (Negative), and a per-channel stretch would blow its noise up into a pattern. Pooling
    all channels (not only the references) lets a green channel brighter than the stains set
    the scale instead of being clipped. A high percentile, not the maximum, so that a few hot
    pixels do not decide it (the top 0.01% saturate). The floor of 255 keeps a nearly black
    field black: a 16-bit value never maps above its own number.

    Computed on the whole field; crops and resized copies of it must use the whole field's
    scale (``to_uint8(part, scale=field_scale(field))``) to look the same as the field.
    """
    field = np.asarray(field)
    if field.dtype == np.uint8:
        return 255.0
    if np.issubdtype(field.dtype, np.floating):
        return 1.0
    if field.dtype != np.uint16:
        raise TypeError(f"expected uint8, uint16 or float array, got {field.dtype}")
    if field.size == 0:
        return 65535.0
    counts = np.bincount(field.ravel(), minlength=65536)
    rank = percentile / 100.0 * (field.size - 1)  # the value at this rank of the sorted pixels (lower one)
    value = int(np.searchsorted(np.cumsum(counts), int(np.floor(rank)) + 1))
    return float(min(max(value, 255), 65535))


def to_float(field: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Scale a uint8/uint16 array to float32 in [0, 1].

    uint8: / 255. uint16: / ``scale`` (default :func:`field_scale` of ``field`` itself: its
    own range, see there), clipped to 1. Float arrays are returned as float32.
    """
    if field.dtype == np.uint8:
        return field.astype(np.float32) / 255.0
    if field.dtype == np.uint16:
        s = field_scale(field) if scale is None else float(scale)
        return np.minimum(field.astype(np.float32) / np.float32(s), 1.0)
    if np.issubdtype(field.dtype, np.floating):
        return field.astype(np.float32, copy=False)
    raise TypeError(f"expected uint8, uint16 or float array, got {field.dtype}")


def read_field_float(folder: str | os.PathLike, image_id: str) -> np.ndarray:
    """:func:`read_field` scaled to float32 ``(4, H, W)`` in [0, 1] (:func:`to_float`)."""
    return to_float(read_field(folder, image_id))


def to_uint8(field: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Convert a uint8/uint16/float-in-[0,1] array to uint8.

    uint8 is returned as it is; uint16 becomes ``round(v * 255 / scale)`` clipped to 255, with
    ``scale`` the field's own range (:func:`field_scale`; pass the whole field's scale when
    converting a part or a resized copy of it); float is ``round(v * 255)`` clipped.
    """
    if field.dtype == np.uint8:
        return field
    if field.dtype == np.uint16:
        s = field_scale(field) if scale is None else float(scale)
        out = field.astype(np.float32) * np.float32(255.0 / s)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.clip(np.rint(to_float(field) * 255.0), 0, 255).astype(np.uint8)


def field_to_uint8(field: np.ndarray, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """A field as uint8, optionally resized first: the one conversion every consumer shares.

    The scale comes from the full-resolution field (:func:`field_scale`), so the field cache,
    the cell crops and the isolated-cell view of one field agree; the resize happens before
    the conversion (16-bit precision is kept through the interpolation). 8-bit fields are only
    resized.
    """
    scale = field_scale(field)
    small = field if size is None else resize_field(field, size)
    return to_uint8(small, scale)


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


