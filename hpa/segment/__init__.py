"""Cell segmentation: segmenters chosen by name.

A segmenter is an object with ``segment(field) -> (cell_mask, nuclei_mask)``: ``field``
is a uint8/uint16 ``(4, H, W)`` array (red, green, blue, yellow); both masks are int32
``(H, W)``, 0 = background, cells numbered 1..K consecutively, nucleus k labelled k and
lying inside cell k, every cell with exactly one nucleus (hpacellseg with its default
labeler keeps the package's cells without a nucleus). A field without nuclei gives two
empty masks and a logged warning.

>>> seg = get_segmenter("classical", work_size=512)
>>> cells, nuclei = seg.segment(field)

``segment.segmenter=auto`` is settled per run by :func:`resolve_segmenter`.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from hpa.segment.common import check_masks, finalize_masks

__all__ = ["get_segmenter", "available_segmenters", "register_segmenter", "resolve_segmenter", "check_masks",
           "finalize_masks"]

log = logging.getLogger(__name__)


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


def resolve_segmenter(name: str, nuclei_weights=None, cell_weights=None) -> tuple[str, str]:
    """The segmenter a run uses for setting ``segment.segmenter=name``, and why.

    ``auto``: ``hpacellseg`` when both weight paths are set, both files exist and the
    hpacellseg package imports (with the adapter's shims); ``classical`` otherwise. The
    reason names what was missing. A weight path that is set but unusable (file absent,
    or package not importable) is also logged as a warning: it suggests the run was
    meant to use hpacellseg. Any other registered name is returned as it is (its own
    constructor reports what it lacks).

    Args:
        name: ``auto`` or a name of :func:`available_segmenters`.
        nuclei_weights, cell_weights: ``segment.hpacellseg.nuclei_weights`` / ``cell_weights``
            (paths, or None / "" when not set).
    Returns:
        ``(segmenter name, reason)``, the reason one line for the log and the report.
    Raises:
        ValueError: unknown name.
    """
    if name != "auto":
        if name not in _REGISTRY:
            raise ValueError(f"unknown segmenter {name!r} (setting segment.segmenter); "
                             f"valid: auto, {', '.join(available_segmenters())}")
        return name, f"segment.segmenter={name}"
    keys = (("segment.hpacellseg.nuclei_weights", nuclei_weights), ("segment.hpacellseg.cell_weights", cell_weights))
    unset = [k for k, v in keys if v is None or str(v).strip() == ""]
    if len(unset) == 2:
        return "classical", "auto: classical, no hpacellseg weights set (segment.hpacellseg.nuclei_weights, cell_weights)"
    problems = [f"{k} not set" for k in unset]
    for k, v in keys:
        if k not in unset:
            path = os.path.expanduser(str(v))
            if not os.path.isfile(path):
                problems.append(f"{k} file {path} does not exist")
    if not problems:
        from hpa.segment.hpacellseg_adapter import import_hpacellseg

        try:
            import_hpacellseg()
        except Exception as exc:  # ImportError, or a broken install failing at import time
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(f"the hpacellseg package does not import ({first})")
    if problems:
        reason = "auto: classical, hpacellseg weights are set but " + "; ".join(problems)
        log.warning("segment.segmenter=auto: using the classical segmenter: %s", "; ".join(problems))
        return "classical", reason
    return "hpacellseg", ("auto: hpacellseg, the package imports and both weight files exist "
                          f"({nuclei_weights}, {cell_weights})")
