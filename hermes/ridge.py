"""Solvers of the distilled student's training, written here for what the libraries lack:

- `ridge`: ridge regression with an intercept on a sparse block and a dense block of features,
  solved exactly in float64 by Cholesky in the smaller of the two spaces, its one large matrix
  summed in place from sparse products of row blocks (add_gram / add_outer) and factorised in
  place (cholesky_solve). scikit-learn's Ridge takes sparse and dense features only as one
  matrix and keeps copies of the system that would double the memory bound here;
- `logistic`: multinomial logistic regression held near a prior weight matrix (the teacher's
  codewords) rather than near zero, by L-BFGS.
"""


from __future__ import annotations


import numpy as np

from hermes.errors import HermesError



def logistic(R: np.ndarray, y: np.ndarray, prior: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression of y on the rows of R, minimising the mean cross-entropy plus
    lam/2 (|W - prior|^2 + |b|^2), by L-BFGS in float64 from W = prior, b = 0."""
    import torch

    Rt, yt = torch.from_numpy(R.astype(np.float64)), torch.from_numpy(y.astype(np.int64))
    W0 = torch.from_numpy(prior.astype(np.float64))
    W = W0.clone().requires_grad_(True)
    b = torch.zeros(len(W0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = (torch.nn.functional.cross_entropy(Rt @ W.T + b, yt)
                 + lam / 2 * (((W - W0) ** 2).sum() + (b ** 2).sum()))
        value.backward()
        return value

    opt.step(loss)
    return W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32)


def ridge(Xs, D: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression with an intercept of Y on the columns [Xs (sparse), D (dense)]: returns the
    weights of each part and the intercept. Solved exactly, in float64, by a Cholesky factorisation
    in the smaller of the two spaces: features (k x k) when there are fewer features than
    documents, else documents (n x n). That one matrix is the memory bound: it is summed from
    sparse products of row blocks, centred and factorised in place. Dense products run in torch:
    numpy's bundled OpenBLAS crashed (segfault) on products of this size on the development
    machine."""
    import torch

    n, ks = Xs.shape
    k = ks + D.shape[1]
    Xs = Xs.astype(np.float64).tocsr()
    Dt = torch.from_numpy(D.astype(np.float64))
    mu = torch.cat([torch.from_numpy(np.asarray(Xs.mean(axis=0)).ravel()), Dt.mean(0)])
    Yt = torch.from_numpy(Y.astype(np.float64))
    ybar = Yt.mean(0)
    Yc = Yt - ybar
    if k <= n:
        G = torch.zeros((k, k), dtype=torch.float64)
        add_gram(G[:ks, :ks].numpy(), Xs)                 # a view: G's own memory
        XtD = torch.from_numpy(np.asarray(Xs.T @ Dt.numpy()))
        G[:ks, ks:] = XtD
        G[ks:, :ks] = XtD.T
        G[ks:, ks:] = Dt.T @ Dt
        del XtD
        G.addr_(mu, mu, alpha=-n)
        G.diagonal().add_(alpha)
        W = cholesky_solve(G, torch.cat([torch.from_numpy(np.asarray(Xs.T @ Yc.numpy())), Dt.T @ Yc]))
    else:
        K = Dt @ Dt.T
        add_outer(K.numpy(), Xs)
        r = K.mean(1)
        K -= r[:, None]
        K -= (r - r.mean())[None, :]                         # the Gram matrix of the centred rows
        K.diagonal().add_(alpha)
        A = cholesky_solve(K, Yc)
        # the rows of A sum to zero, so the centred and plain products agree
        W = torch.cat([torch.from_numpy(np.asarray(Xs.T @ A.numpy())), Dt.T @ A])
    b = ybar - mu @ W
    W = W.numpy().astype(np.float32)
    return W[:ks], W[ks:], b.numpy().astype(np.float32)


def add_gram(G: np.ndarray, A, budget: int = 20_000_000) -> None:
    """G += A^T A for a sparse CSR A, in place (G may be a view), summed over blocks of rows so that
    no sparse product holds more than about `budget` entries."""
    upto = np.cumsum(np.diff(A.indptr).astype(np.int64) ** 2)       # product entries up to each row, at most
    start = 0
    while start < A.shape[0]:
        done = upto[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(upto, done + budget, side="right")))
        P = (A[start:stop].T @ A[start:stop]).tocoo()
        G[P.row, P.col] += P.data                       # a product's entries are distinct
        start = stop


def add_outer(K: np.ndarray, A, block: int = 1024) -> None:
    """K += A A^T for a sparse CSR A, in place, a block of rows at a time."""
    At = A.T.tocsc()
    for start in range(0, A.shape[0], block):
        K[start:start + block] += (A[start:start + block] @ At).toarray()


def cholesky_solve(A, B):
    """A X = B for a symmetric positive definite torch matrix A (float64), which it overwrites with
    its Cholesky factor (lower triangle; the upper one is left as garbage), so the solve needs no
    second matrix of A's size. A blocked right-looking factorisation in torch: LAPACK's own potrf
    through scipy (numpy's bundled OpenBLAS) crashed (segfault) at 17k on the development machine
    when threaded, and torch.linalg.cholesky copies."""
    import torch

    n, block = A.shape[0], 1024
    for j in range(0, n, block):
        e = min(j + block, n)
        L, info = torch.linalg.cholesky_ex(A[j:e, j:e])
        if info.item() != 0:
            raise HermesError(f"ridge regression: the system is not positive definite (pivot {j + info.item()})")
        A[j:e, j:e] = L
        if e < n:
            below = torch.linalg.solve_triangular(L.T, A[e:, j:e], upper=True, left=False)
            A[e:, j:e] = below
            A[e:, e:].addmm_(below, below.T, alpha=-1)
    Y = torch.linalg.solve_triangular(A, B, upper=False)             # reads the lower triangle only
    return torch.linalg.solve_triangular(A.T, Y, upper=True)
