"""Row vectors: the one unit-norm scaling every module uses, and sparse count rows."""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of x scaled to unit length (an all-zero row stays zero); a new array, same dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def count_rows(columns: np.ndarray, lengths: np.ndarray, width: int, dtype=np.float64):
    """A (len(lengths), width) CSR matrix of counts: row i counts the columns of its run of
    `columns` (the runs concatenated, `lengths[i]` long). A column repeated in a row is stored
    twice; products and sums add the copies (scipy.sparse)."""
    import scipy.sparse as sp

    indptr = np.concatenate([[0], np.cumsum(lengths)])
    return sp.csr_matrix((np.ones(len(columns), dtype=dtype), columns, indptr), shape=(len(lengths), width))
