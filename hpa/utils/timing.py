"""Wall-clock timings of stages, kept in ``RUN/timings/{stage}.json`` for the report."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from hpa.utils.fs import write_json


@contextlib.contextmanager
def stage_timer(run: str | Path, stage: str):
    """Time the body and record ``{"stage", "seconds", "finished"}`` when it completes.

    A re-run that only resumes adds its seconds to the recorded total, so an interrupted
    and resumed stage reports the time it really took.
    """
    path = Path(run) / "timings" / f"{stage}.json"
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    prev = 0.0
    if path.is_file():
        try:
            prev = float(json.loads(path.read_text()).get("seconds", 0.0))
        except (ValueError, OSError):
            prev = 0.0
    write_json(path, {"stage": stage, "seconds": round(prev + seconds, 2), "last_run_seconds": round(seconds, 2),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_timings(run: str | Path) -> dict[str, float]:
    """``{stage: seconds}`` of every recorded stage of a run."""
    out = {}
    for p in sorted((Path(run) / "timings").glob("*.json")):
        try:
            out[p.stem] = float(json.loads(p.read_text())["seconds"])
        except (ValueError, KeyError, OSError):
            continue
    return out
