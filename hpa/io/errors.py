"""The error every reader raises for bad input data.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input data: the message names the file or row and says what is wrong."""
