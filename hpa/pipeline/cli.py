"""What every stage script shares: its log file in ``RUN/logs/`` and one error wrapper.

A stage script parses its arguments, then hands its body to :func:`run_stage`:

- the log goes to the terminal (stderr) and is appended to ``RUN/logs/{stage}.log`` with a
  header naming the command, so a run keeps the record of every stage that ran in it (under
  torchrun, ranks other than 0 write ``{stage}.rank{R}.log``);
- a bad setting or bad input (:class:`hpa.config.ConfigError`, :class:`hpa.io.errors.InputError`,
  :class:`hpa.eval.submission.SubmissionError`, a missing file, a cache the disk cannot hold:
  :class:`hpa.utils.fs.NotEnoughSpace`) ends the stage with one line,
  ``{stage}: error: {message}``, exit status 1, and the same line in the log file; any other
  exception is a bug: its traceback goes to the terminal and to the log file.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from hpa.config import ConfigError
from hpa.eval.submission import SubmissionError
from hpa.io.errors import InputError
from hpa.utils.fs import NotEnoughSpace
from hpa.utils.log import setup_logging

log = logging.getLogger(__name__)

#: Errors that mean "the input or the settings are wrong", not "the code is wrong".
USER_ERRORS = (ConfigError, InputError, SubmissionError, FileNotFoundError, NotEnoughSpace)


def log_path(run: str | os.PathLike, stage: str) -> Path:
    """``RUN/logs/{stage}.log`` (``{stage}.rank{R}.log`` for torchrun ranks other than 0)."""
    rank = int(os.environ.get("RANK", "0"))
    return Path(run) / "logs" / (f"{stage}.log" if rank == 0 else f"{stage}.rank{rank}.log")


def run_stage(stage: str, run: str | os.PathLike | None, body: Callable[[], object]) -> object:
    """Run ``body()`` as stage ``stage`` of run directory ``run`` (see the module docstring)."""
    setup_logging()
    handler = None
    if run is not None:
        path = log_path(run, stage)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:  # the run folder is not writable: the stage itself will say so
            log.warning("cannot write the log file %s (%s); logging to the terminal only", path, exc)
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s",
                                                   datefmt="%Y-%m-%d %H:%M:%S"))
            logging.getLogger().addHandler(handler)
            log.info("=== %s started %s: %s", stage, time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(sys.argv))
    try:
        return body()
    except USER_ERRORS as exc:
        log.debug("stage %s stopped", stage, exc_info=True)
        if handler is not None:
            handler.stream.write(f"{stage}: error: {exc}\n")
        sys.exit(f"{stage}: error: {exc}")
    except BaseException:  # a bug, or an interruption: the traceback goes to the log file too
        if handler is not None:
            handler.stream.write(traceback.format_exc())
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
