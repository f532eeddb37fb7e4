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


class StepTimer:
    """Wall-clock and CPU seconds of named steps: ``with timer.step("read"): ...``.

    ``wall`` and ``cpu`` map each step name to its seconds (summed over repeated steps;
    steps given to the constructor start at 0). CPU time is the process's
    (:func:`time.process_time`: every thread, no child process); on a machine shared with
    other jobs it tells what a step costs when its wall clock includes waiting for a core.
    """

    def __init__(self, steps=()):
        self.wall = dict.fromkeys(steps, 0.0)
        self.cpu = dict.fromkeys(steps, 0.0)

    @contextlib.contextmanager
    def step(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def update(self, other: "StepTimer") -> None:
        """Add another timer's steps to this one's."""
        for name in other.wall:
            self.wall[name] = self.wall.get(name, 0.0) + other.wall[name]
            self.cpu[name] = self.cpu.get(name, 0.0) + other.cpu[name]
