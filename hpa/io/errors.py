"""The error every reader raises for bad input data, and the check that an output folder was made
with the settings of the call that would add to it.
"""

from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    """Bad input data: the message names the file or row and says what is wrong."""


def check_same_settings(path: Path, settings: dict, force: bool, what: str, remedy: str) -> None:
    """Raise :class:`InputError` when ``path`` (a JSON record of the settings an output folder was
    made with) disagrees with ``settings`` on any key: resuming would mix outputs of two settings.

    Nothing to check when ``force`` (everything is redone) or when the record does not exist yet.
    The message lists every key that differs (old -> new), says what the folder holds (``what``)
    and how to go on (``remedy``).
    """
    if force or not path.is_file():
        return
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise InputError(f"{path.parent} holds {what} made with other settings ({detail}); {remedy}")
