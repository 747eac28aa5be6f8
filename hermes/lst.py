"""The Learned Semantic Transform (LST), trained jointly with the residual codebooks (HERMES).

    h = normalize(W e + b),   W square, initialised at the identity, b at zero

Loss per batch (weights configurable; as published except the structure weight, 10 instead of 1,
which keeps the bias from collapsing the space):

    structure      mean over random pairs (i, j) of (cos(e_i, e_j) - cos(h_i, h_j))^2
    reconstruction mean ||h - normalize(q)||^2, q = the sum of h's three codewords (no gradient to q)
    orthogonality  0.1 x ||W^T W - I||^2, and W is projected back to the nearest orthogonal matrix
                   (polar decomposition) after every step
    commitment     0.25 x mean over stages of ||r_{s-1} - C_s[c_s]||^2 (residuals pulled to their codewords)

Codebooks are initialised by the k-means quantizer on the initial h, then updated by exponential
moving averages of the residuals assigned to them (as in VQ-VAE), and a codeword whose EMA count
falls below `dead_threshold` is reset to a residual of the current batch. Training stops early when
an epoch's loss improves by less than `min_delta` (relative) for `patience` epochs. Encoding
afterwards is the quantizer's fixed argmax per stage (beam 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hermes.errors import NotFittedError
from hermes.rvq import ResidualQuantizer
from hermes.vectors import unit_rows


@dataclass(frozen=True)
class LSTSettings:
    epochs: int = 20
    max_steps: int = 3000
    batch_size: int = 2048
    lr: float = 1e-3
    w_structure: float = 10.0         # published: 1.0 (see configs/default.yaml for why 10)
    w_reconstruction: float = 1.0
    w_orthogonality: float = 0.1
    w_commitment: float = 0.25
    ema_decay: float = 0.99
    dead_threshold: float = 0.01     # EMA count (documents per batch) under which a codeword is reset
    patience: int = 2
    min_delta: float = 1e-3


class LearnedSemanticTransform:
    """Fit with `fit(X)`: W, b and the codebooks of `quantizer` are trained together; the learned
    state is `W_`, `b_`, `quantizer_` (a trained copy of `quantizer`) and `history_` (loss per epoch)."""

    kind = "lst"

    def __init__(self, settings: LSTSettings = LSTSettings(), quantizer: ResidualQuantizer | None = None,
                 seed: int = 0):
        self.settings = settings
        self.quantizer = quantizer
        self.seed = seed

    # -- the transform interface (see hermes.transform) ---------------------------------
    def transform(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "W_"):
            raise NotFittedError("this LearnedSemanticTransform is not fitted yet")
        return unit_rows(np.asarray(X, dtype=np.float32) @ self.W_.T + self.b_)

    def params(self) -> dict:
        return {"kind": self.kind, **self.settings.__dict__}

    def state(self) -> dict[str, np.ndarray]:
        return {"W": self.W_, "b": self.b_}

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray]) -> "LearnedSemanticTransform":
        t = cls(LSTSettings(**{k: v for k, v in params.items() if k != "kind"}))
        t.W_ = arrays["W"].astype(np.float32)
        t.b_ = arrays["b"].astype(np.float32)
        return t

    def fit(self, X: np.ndarray, fixed: dict[int, np.ndarray] | None = None,
            progress: Callable[[str], None] | None = None) -> "LearnedSemanticTransform":
        """Train on X (unit-norm embeddings). `fixed` gives the class index per row of X for each
        fixed stage of the quantizer: such a stage takes those codes instead of the argmax, its
        codewords follow the EMA of its classes' residuals like any other (never reset), and at the
        end they are the exact class means of the residuals in the final transformed space."""
        from hermes.rvq import assign, class_means

        if self.quantizer is None:
            raise ValueError("an LST is fitted with a quantizer: LearnedSemanticTransform(settings, quantizer)")
        X = np.ascontiguousarray(X, dtype=np.float32)
        fixed = {s: np.asarray(c, dtype=np.int64) for s, c in (fixed or {}).items()}
        quantizer = copy.deepcopy(self.quantizer)
        self.W_, self.b_, self.history_ = _train_jointly(X, quantizer, self.settings, self.seed, progress, fixed)
        if fixed:
            R = self.transform(X)
            for si, C in enumerate(quantizer.codebooks_):
                if si in fixed:
                    C = quantizer.codebooks_[si] = class_means(R, fixed[si], len(C))
                    R -= C[fixed[si]]
                else:
                    R -= C[assign(R, C)[0]]
        quantizer.n_fit_ = len(X)
        self.quantizer_ = quantizer
        return self

    def orthogonality_error(self) -> float:
        W = self.W_.astype(np.float64)
        return float(np.abs(W.T @ W - np.eye(len(W))).max())


def _train_jointly(X: np.ndarray, quantizer: ResidualQuantizer, s: LSTSettings, seed: int,
                   progress: Callable[[str], None] | None, fixed: dict[int, np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The training loop: returns W, b and the loss history; leaves the trained codebooks in
    `quantizer` (which it first fits, as their k-means initialisation)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, d = X.shape
    quantizer.fit(X, fixed=fixed)         # k-means initialisation on the initial h = e
    fixed_t = {s_: torch.from_numpy(c) for s_, c in fixed.items()}
    books = [torch.from_numpy(c.copy()) for c in quantizer.codebooks_]
    sizes = [len(c) for c in books]
    ema_count = [torch.full((k,), max(1.0, min(s.batch_size, n) / k)) for k in sizes]
    ema_sum = [c * ema_count[i][:, None] for i, c in enumerate(books)]

    W = torch.nn.Parameter(torch.eye(d))
    b = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([W, b], lr=s.lr)
    eye = torch.eye(d)
    Xt = torch.from_numpy(X)
    history: list[dict] = []
    best, stale = float("inf"), 0
    batch = min(s.batch_size, n)
    total_steps = 0
    for epoch in range(s.epochs):
        if total_steps >= s.max_steps:
            break
        perm = torch.from_numpy(rng.permutation(n))
        totals = {"structure": 0.0, "reconstruction": 0.0, "orthogonality": 0.0, "commitment": 0.0, "loss": 0.0}
        steps = 0
        for start in range(0, n - batch + 1 if n >= batch else 1, batch):
            rows = perm[start:start + batch]
            e = Xt[rows]
            h = torch.nn.functional.normalize(e @ W.T + b, dim=1)
            # structure: random pairs within the batch
            j = torch.from_numpy(rng.permutation(len(e)))
            structure = (((e * e[j]).sum(1) - (h * h[j]).sum(1)) ** 2).mean()
            # quantize with the current codebooks (argmax per stage, no gradient through the codes)
            r = h
            q = torch.zeros_like(h)
            commit = h.new_zeros(())
            assigned = []
            for si, C in enumerate(books):
                with torch.no_grad():
                    codes = fixed_t[si][rows] if si in fixed_t else \
                        (r @ torch.nn.functional.normalize(C, dim=1).T).argmax(1)
                cw = C[codes]
                commit = commit + ((r - cw) ** 2).sum(1).mean()
                assigned.append((codes, r.detach()))
                q = q + cw
                r = r - cw
            commit = commit / len(books)
            recon = ((h - torch.nn.functional.normalize(q, dim=1)) ** 2).sum(1).mean()
            orth = ((W.T @ W - eye) ** 2).sum()
            loss = (s.w_structure * structure + s.w_reconstruction * recon + s.w_orthogonality * orth
                    + s.w_commitment * commit)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                U, _, Vh = torch.linalg.svd(W)          # nearest orthogonal matrix
                W.copy_(U @ Vh)
                for si, (codes, res) in enumerate(assigned):
                    k = sizes[si]
                    cnt = torch.bincount(codes, minlength=k).float()
                    sm = torch.zeros(k, d).index_add_(0, codes, res)
                    ema_count[si].mul_(s.ema_decay).add_(cnt, alpha=1 - s.ema_decay)
                    ema_sum[si].mul_(s.ema_decay).add_(sm, alpha=1 - s.ema_decay)
                    books[si] = ema_sum[si] / ema_count[si].clamp_min(1e-6)[:, None]
                    dead = torch.nonzero(ema_count[si] < s.dead_threshold).flatten()
                    if len(dead) and si not in fixed_t:     # a fixed stage's classes are what they are
                        pick = torch.from_numpy(rng.choice(len(res), len(dead), replace=len(dead) > len(res)))
                        books[si][dead] = res[pick]
                        ema_sum[si][dead] = res[pick]
                        ema_count[si][dead] = 1.0
            for key, v in (("structure", structure), ("reconstruction", recon), ("orthogonality", orth),
                           ("commitment", commit), ("loss", loss)):
                totals[key] += float(v.detach())
            steps += 1
            total_steps += 1
            if total_steps >= s.max_steps:
                break
        row = {"epoch": epoch + 1, **{k: round(v / max(steps, 1), 6) for k, v in totals.items()}}
        history.append(row)
        if progress:
            progress(f"fit: LST epoch {row['epoch']}: loss {row['loss']:.5f} (structure {row['structure']:.5f}, "
                     f"reconstruction {row['reconstruction']:.5f}, commitment {row['commitment']:.5f})")
        if row["loss"] < best * (1 - s.min_delta):
            best, stale = row["loss"], 0
        else:
            stale += 1
            if stale >= s.patience:
                break

    quantizer.codebooks_ = [c.numpy().astype(np.float32) for c in books]
    return W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32), history
