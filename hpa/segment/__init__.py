"""Cell segmentation: segmenters chosen by name.

A segmenter is an object with ``segment(field) -> (cell_mask, nuclei_mask)``: ``field``
is a uint8/uint16 ``(4, H, W)`` array (red, green, blue, yellow); both masks are int32
``(H, W)``, 0 = background, cells numbered 1..K consecutively, nucleus k labelled k and
lying inside cell k, every cell with exactly one nucleus. A field without nuclei gives
two empty masks and a logged warning.

>>> seg = get_segmenter("classical", work_size=512)
>>> cells, nuclei = seg.segment(field)
"""

from __future__ import annotations

from typing import Callable

from hpa.segment.common import check_masks, finalize_masks

__all__ = ["get_segmenter", "available_segmenters", "register_segmenter", "check_masks", "finalize_masks"]


def _classical(**kw):
    from hpa.segment.classical import ClassicalSegmenter

    return ClassicalSegmenter(**kw)


def _hpacellseg(**kw):
    from hpa.segment.hpacellseg_adapter import HPACellSegmenter

    return HPACellSegmenter(**kw)


_REGISTRY: dict[str, Callable] = {"classical": _classical, "hpacellseg": _hpacellseg}


def register_segmenter(name: str, factory: Callable) -> None:
    """Add a segmenter factory ``factory(**kw) -> segmenter`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"segmenter {name!r} is already registered")
    _REGISTRY[name] = factory


def available_segmenters() -> list[str]:
    """Names accepted by :func:`get_segmenter`."""
    return sorted(_REGISTRY)


def get_segmenter(name: str, **kw):
    """Build the segmenter registered as ``name`` with settings ``kw``.

    Raises ``ValueError`` listing the valid names for an unknown one.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown segmenter {name!r}; available segmenters: {available_segmenters()}")
    return _REGISTRY[name](**kw)
