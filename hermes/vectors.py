"""Row vectors: the one unit-norm scaling every module uses, sparse count rows, and ranks within groups."""

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


def rank_within(groups: np.ndarray) -> np.ndarray:
    """Each element's rank among the elements of its group (equal values of `groups`), in the
    array's order: 0 for a group's first, 1 for its second, ..."""
    by_group = np.argsort(groups, kind="stable")
    rank = np.empty(len(groups), dtype=np.int64)
    rank[by_group] = rank_in_runs(groups[by_group])
    return rank


def rank_in_runs(groups: np.ndarray) -> np.ndarray:
    """rank_within for groups that are runs already (each group's elements next to each other):
    no sort."""
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def gather_runs(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[starts[i]:starts[i] + lengths[i]] for each i, concatenated."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return values[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]
