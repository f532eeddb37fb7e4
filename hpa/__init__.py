"""Weakly supervised single-cell classification for Human Protein Atlas images.

Image-level labels -> image classifier -> class activation maps -> cell masks ->
cell pseudo-labels -> cell classifier (two cycles) -> per-cell predictions.
"""

__version__ = "0.1.0"
