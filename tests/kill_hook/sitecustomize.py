"""Test hook: SIGKILL a stage at a chosen call of a chosen function, in whichever process makes it.

Used by tests/pipeline/test_robustness.py to interrupt a stage at a point fixed in advance
rather than at whatever moment a timer fires. With this folder first on ``PYTHONPATH``, Python
imports this ``sitecustomize`` at start-up in the stage's process *and* in every worker process
it spawns (``spawn`` starts a fresh interpreter with the same environment), and the hook wraps
the target function in its defining module before any other module imports it, so every
``from module import function`` sees the wrapper. Without ``HPA_KILL_AT`` it does nothing.

Environment:

- ``HPA_KILL_AT``: ``package.module:function``, e.g. ``hpa.io.fields:write_mask``;
- ``HPA_KILL_CALL``: N; the N-th counted call, over all processes of the stage, triggers the kill;
- ``HPA_KILL_WHEN``: ``before`` (the call does not run) or ``after`` (it has returned; default);
- ``HPA_KILL_MATCH``: optional; only calls whose first argument's ``str()`` contains it are counted;
- ``HPA_KILL_COUNTER``: a file; one byte is appended per counted call, under an exclusive lock,
  so the count is exact across processes and the test can read it afterwards;
- ``HPA_KILL_NOT_PGID``: the test runner's process group: the hook refuses to kill that group
  (the stage must run in a session of its own, ``start_new_session=True``).

The kill is ``SIGKILL`` to the caller's whole process group: the stage and its workers die at
once, as with ``kill -9 -PGID``; nothing (no ``finally``, no ``atexit``) runs.
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import os
import signal


def _count(counter: str) -> int:
    with open(counter, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(b".")
        f.flush()
        return os.fstat(f.fileno()).st_size


def _kill() -> None:
    group = os.getpgrp()
    if str(group) == os.environ.get("HPA_KILL_NOT_PGID"):
        raise RuntimeError("kill hook: the stage shares the test runner's process group; start it with "
                           "start_new_session=True")
    os.killpg(group, signal.SIGKILL)


def _install() -> None:
    target = os.environ.get("HPA_KILL_AT")
    if not target:
        return
    module_name, _, name = target.partition(":")
    n = int(os.environ["HPA_KILL_CALL"])
    when = os.environ.get("HPA_KILL_WHEN", "after")
    if when not in ("before", "after"):
        raise ValueError(f"HPA_KILL_WHEN must be 'before' or 'after', got {when!r}")
    match = os.environ.get("HPA_KILL_MATCH")
    counter = os.environ["HPA_KILL_COUNTER"]
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    @functools.wraps(real)  # same __module__ and __qualname__: pickled by reference to worker processes
    def wrapper(*args, **kwargs):
        counted = match is None or (bool(args) and match in str(args[0]))
        if counted and when == "before" and _count(counter) >= n:
            _kill()
        out = real(*args, **kwargs)
        if counted and when == "after" and _count(counter) >= n:
            _kill()
        return out

    setattr(module, name, wrapper)


_install()
