"""Row vectors: the one unit-norm scaling every module uses."""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of x scaled to unit length (an all-zero row stays zero); a new array, same dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
