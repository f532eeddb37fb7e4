"""Logging set-up shared by the stage scripts (one logger per module)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | int | None = None) -> None:
    """Log to stderr as ``HH:MM:SS stage LEVEL message``; level from ``HPA_LOG`` (default INFO)."""
    level = level or os.environ.get("HPA_LOG", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
