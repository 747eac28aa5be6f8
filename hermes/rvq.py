"""Residual vector quantization with cosine assignment.

Stage s holds a codebook C_s (k_s x d). Encoding is a fixed argmax per stage (beam 1):

    r_0 = x;   c_s = argmax_j cos(r_{s-1}, C_s[j]);   r_s = r_{s-1} - C_s[c_s]

so c1 is always the stage-1 codeword with the highest cosine to x. A fixed stage (hermes.stack)
takes its codes from outside (a source, a taxonomy class) instead of the argmax, and its codeword
for a class is the mean of that class's residuals. Each learned codebook is fitted by
Lloyd iterations with the same assignment rule on the previous stage's residuals (k-means++
seeding, codeword = mean of its members, an empty codeword is re-seeded at the worst-served
point), so the fit optimises exactly what encoding does. As FAISS does, Lloyd runs on at most
`max_points_per_code` (256) fit vectors per codeword, a seeded subsample of larger fit sets.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hermes.errors import HermesError, NotFittedError
from hermes.vectors import unit_rows

CHUNK = 16384
KMEANSPP_MAX_K = 1024


MAX_CODEBOOK = 256          # HERMES's codebook size, the largest the rule picks
DOCS_PER_L12_CELL = 128     # the rule: about N / 128 L12 cells (a top-30% filter leaves ~40 per cell)...
DOCS_PER_L123_CELL = 2      # ... and about N / 2 L123 cells


def capped_codebook_size(n_fit: int, codebook_size: int, min_points_per_code: int) -> int:
    """Codewords per stage for a fit sample of n_fit vectors.

    The cap keeps at least `min_points_per_code` fit vectors per codeword (39 by default,
    the least that FAISS accepts without a warning), and never goes below 2.
    """
    return int(max(2, min(codebook_size, n_fit // min_points_per_code)))


def plan_codebook_sizes(n_docs: int, n_fit: int, fixed: dict[int, int] | None = None, stages: int = 3,
                        codebook_size: int | None = None, codebook_sizes: list[int | None] | None = None,
                        min_points_per_code: int = 39) -> tuple[list[int], str]:
    """The codewords of each stage, chosen together, and the reason in words.

    Without an override, the rule works from the corpus size N (`n_docs`, not the fit sample):
    level l should have about T_l cells, T_2 = N / 128 and T_3 = N / 2, with T_1 = sqrt(T_2) so the
    first two stages split L12 evenly. Stage by stage, a learned stage gets floor(T_l / K) codewords
    (K: the cells of the level above, as sized so far), within [2, 256]; a fixed stage keeps its
    number of classes. So an L12 cell holds about 128 documents on average, and N >= 2 x 256^3
    (33.6M documents) gives HERMES's 256 / 256 / 256. `codebook_size` (every learned stage) or
    `codebook_sizes` (per stage; None for a fixed one) overrides the rule. Either way a learned
    stage has at most n_fit // min_points_per_code codewords (see capped_codebook_size); under the
    rule, the stages after a capped one share what is left of the targets.
    """
    fixed = fixed or {}
    if codebook_sizes is not None:
        if len(codebook_sizes) != stages or any(codebook_sizes[s] is None for s in range(stages) if s not in fixed):
            raise HermesError(f"codebook_sizes {codebook_sizes}: one size per stage ({stages}), null only for a "
                              f"fixed stage")
        why = "codebook_sizes"
    elif codebook_size is not None:
        why = "codebook_size"
    else:
        why = (f"the size rule for {n_docs:,} documents: about N/{DOCS_PER_L12_CELL} L12 cells over the first two "
               f"stages, about N/{DOCS_PER_L123_CELL} L123 cells; at most {MAX_CODEBOOK} per stage")
    l12 = max(n_docs / DOCS_PER_L12_CELL, 4.0)
    targets = [l12 ** 0.5, l12, max(n_docs / DOCS_PER_L123_CELL, 8.0)]
    sizes, capped, cells = [], [], 1
    for s in range(stages):
        if s in fixed:
            sizes.append(fixed[s])
            cells *= fixed[s]
            continue
        if codebook_sizes is not None:
            want = int(codebook_sizes[s])
        elif codebook_size is not None:
            want = int(codebook_size)
        else:
            want = int(min(MAX_CODEBOOK, max(2, targets[min(s, 2)] // cells)))
        k = capped_codebook_size(n_fit, want, min_points_per_code)
        if k < want:
            capped.append(f"{s + 1} from {want}")
        sizes.append(k)
        cells *= k
    text = f"{'/'.join(map(str, sizes))} codewords ({why})"
    if capped:
        text += (f"; capped at {n_fit:,} // {min_points_per_code} = {n_fit // min_points_per_code} to keep at least "
                 f"{min_points_per_code} fit documents per codeword: stage {', '.join(capped)}")
    return sizes, text


def assign(R: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine argmax of each row of R over the rows of C; returns (codes, best cosine * |r|)."""
    Cu = unit_rows(C).astype(np.float32)
    codes = np.empty(len(R), dtype=np.int64)
    score = np.empty(len(R), dtype=np.float32)
    for i in range(0, len(R), CHUNK):
        sims = R[i:i + CHUNK] @ Cu.T
        codes[i:i + CHUNK] = sims.argmax(axis=1)
        score[i:i + CHUNK] = sims[np.arange(len(sims)), codes[i:i + CHUNK]]
    return codes, score


def _member_sums(codes: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """Sum of the rows of R per code (a sparse one-hot product; np.add.at is far slower)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(codes), dtype=np.float32), (codes, np.arange(len(codes)))),
                        shape=(k, len(codes)))
    return np.asarray(onehot @ R, dtype=np.float32)


def class_means(R: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """The mean of the rows of R per class (a zero codeword for a class with no member)."""
    counts = np.bincount(codes, minlength=k).astype(np.float32)
    return _member_sums(codes, R, k) / np.maximum(counts, 1)[:, None]


def fit_codebook(R: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus

    n = len(R)
    # k-means++ costs O(pool * k * d); Lloyd iterations over all of R refine the seeds anyway
    if k > KMEANSPP_MAX_K:     # k-means++ is O(n k d) per seed: for very many codewords, distinct random points
        C = R[np.sort(rng.choice(n, k, replace=False))].astype(np.float32).copy()
    else:
        pool = max(8 * k, 4096)
        seed_pool = R if n <= pool else R[np.sort(rng.choice(n, pool, replace=False))]
        C, _ = kmeans_plusplus(seed_pool, n_clusters=k, random_state=int(rng.integers(2**31 - 1)))
        C = C.astype(np.float32)
    codes = None
    for _ in range(iters):
        new_codes, score = assign(R, C)
        if codes is not None and np.array_equal(new_codes, codes):
            break
        codes = new_codes
        counts = np.bincount(codes, minlength=k)
        sums = _member_sums(codes, R, k)
        nonempty = counts > 0
        C[nonempty] = sums[nonempty] / counts[nonempty, None]
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            # re-seed dead codewords at the points the current codebook serves worst
            err = np.einsum("ij,ij->i", R, R) - score ** 2
            worst = np.argsort(-err, kind="stable")[: len(empty)]
            C[empty] = R[worst]
    return C


class ResidualQuantizer:
    """Fit with `fit(X)`, encode with `encode(X)`; learned state ends in `_`."""

    def __init__(self, stages: int = 3, codebook_size: int | list[int] = 256, min_points_per_code: int = 39,
                 iters: int = 30, seed: int = 0, max_points_per_code: int = 256,
                 fixed: dict[int, int] | None = None):
        self.max_points_per_code = max_points_per_code
        self.fixed = {int(s): int(k) for s, k in (fixed or {}).items()}   # fixed stage -> its number of classes
        self.stages = stages
        self.codebook_size = codebook_size
        self.min_points_per_code = min_points_per_code
        self.iters = iters
        self.seed = seed

    def params(self) -> dict:
        return {"kind": "rvq", "stages": self.stages, "codebook_size": self.codebook_size,
                "min_points_per_code": self.min_points_per_code, "max_points_per_code": self.max_points_per_code,
                "iters": self.iters, "seed": self.seed,
                **({"fixed": {str(s): k for s, k in sorted(self.fixed.items())}} if self.fixed else {})}

    def _check_fixed(self, fixed: dict[int, np.ndarray] | None, n: int) -> dict[int, np.ndarray]:
        fixed = fixed or {}
        if set(fixed) != set(self.fixed):
            raise ValueError(f"codes for the fixed stages {sorted(self.fixed)} are needed, got {sorted(fixed)}")
        out = {}
        for s, codes in fixed.items():
            codes = np.asarray(codes, dtype=np.int64)
            if len(codes) != n or (n and (codes.min() < 0 or codes.max() >= self.fixed[s])):
                raise ValueError(f"stage {s + 1}: {n} codes in [0, {self.fixed[s]}) expected")
            out[s] = codes
        return out

    def fit(self, X: np.ndarray, progress: Callable[[int], None] | None = None,
            fixed: dict[int, np.ndarray] | None = None) -> "ResidualQuantizer":
        """Fit on X; `fixed` gives each fixed stage's class index per row of X."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        fixed = self._check_fixed(fixed, len(X))
        rng = np.random.default_rng(self.seed)
        sizes = self.codebook_size if isinstance(self.codebook_size, list) else [self.codebook_size] * self.stages
        ks = [capped_codebook_size(len(X), int(sizes[s]), self.min_points_per_code) for s in range(self.stages)]
        n_fit = len(X)
        limit = self.max_points_per_code * max(k for s, k in enumerate(ks) if s not in self.fixed) \
            if len(self.fixed) < self.stages else len(X)
        if len(X) > limit:     # as FAISS: Lloyd on at most max_points_per_code points per codeword
            keep = np.sort(rng.choice(len(X), limit, replace=False))
            X = X[keep]
            fixed = {s: c[keep] for s, c in fixed.items()}
        R = X.copy()
        self.codebooks_: list[np.ndarray] = []
        for s in range(self.stages):
            if s in self.fixed:
                codes = fixed[s]
                C = class_means(R, codes, self.fixed[s])
            else:
                C = fit_codebook(R, min(ks[s], len(R)), self.iters, rng)
                codes, _ = assign(R, C)
            R -= C[codes]
            self.codebooks_.append(C)
            if progress:
                progress(s + 1)
        self.n_fit_ = n_fit
        return self

    def _check(self) -> None:
        if not hasattr(self, "codebooks_"):
            raise NotFittedError("this ResidualQuantizer is not fitted yet; call fit() or load a substrate")

    @property
    def sizes_(self) -> list[int]:
        self._check()
        return [len(c) for c in self.codebooks_]

    def encode(self, X: np.ndarray, fixed: dict[int, np.ndarray] | None = None,
               choose: dict[int, Callable[[np.ndarray], np.ndarray]] | None = None) -> np.ndarray:
        """Codes (n, stages), int16; `fixed` gives each fixed stage's class index per row; `choose`
        replaces a learned stage's cosine argmax by a rule on its input residuals (n, d) -> codes."""
        self._check()
        R = np.array(X, dtype=np.float32, copy=True)
        fixed = self._check_fixed(fixed, len(R))
        choose = choose or {}
        out = np.empty((len(R), self.stages), dtype=np.int16)
        for s, C in enumerate(self.codebooks_):
            codes = fixed[s] if s in fixed else choose[s](R) if s in choose else assign(R, C)[0]
            R -= C[codes]
            out[:, s] = codes
        return out

    def decode(self, codes: np.ndarray, stages: int | None = None) -> np.ndarray:
        """Sum of the codewords of the first `stages` stages."""
        self._check()
        stages = self.stages if stages is None else stages
        out = np.zeros((len(codes), self.codebooks_[0].shape[1]), dtype=np.float32)
        for s in range(stages):
            out += self.codebooks_[s][codes[:, s].astype(np.int64)]
        return out

    def reconstruction_errors(self, X: np.ndarray, codes: np.ndarray | None = None) -> list[float]:
        """Mean squared residual norm after each stage (of X's own codes, or of `codes` given)."""
        codes = self.encode(X) if codes is None else codes
        return [float(np.mean(np.sum((X - self.decode(codes, s + 1)) ** 2, axis=1)))
                for s in range(self.stages)]
