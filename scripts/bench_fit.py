"""Benchmark fitting the substrate (LST + 3-stage RVQ, and plain RVQ) against scikit-learn k-means.

Synthetic unit vectors of dimension 384 drawn around 2,000 random centres (timing only), 256
codewords per stage. For each size (default 100k and 1M) it times, on the same data, in one run:
- `hermes_lst_rvq`: the default substrate fit (k-means initialisation + joint LST training);
- `hermes_plain_rvq`: the k-means-only 3-stage quantizer;
- `sklearn_kmeans`: `sklearn.cluster.KMeans(n_clusters=256, n_init=1, max_iter=30)`, one stage only,
  the baseline a user would otherwise run.
Prints JSON.

    python scripts/bench_fit.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def data(n: int, d: int = 384, centres: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.8 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--skip-sklearn-above", type=int, default=10**9)
    args = ap.parse_args()
    from sklearn.cluster import KMeans

    from hermes.config import load_config
    from hermes.lst import LearnedSemanticTransform, LSTSettings
    from hermes.rvq import ResidualQuantizer

    cfg = load_config()
    w = cfg.lst_weights
    settings = LSTSettings(epochs=cfg.lst_epochs, max_steps=cfg.lst_max_steps, batch_size=cfg.lst_batch_size,
                           lr=cfg.lst_lr, w_structure=w["structure"], w_reconstruction=w["reconstruction"],
                           w_orthogonality=w["orthogonality"], w_commitment=w["commitment"])
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        X = data(n)
        row = {"n": n, "dim": X.shape[1], "codewords_per_stage": 256}
        t = time.perf_counter()
        lst = LearnedSemanticTransform(settings, ResidualQuantizer(codebook_size=256, seed=0), seed=0).fit(X)
        q = lst.quantizer_
        row["hermes_lst_rvq_s"] = round(time.perf_counter() - t, 1)
        row["lst_epochs_run"] = len(lst.history_)
        row["lst_orthogonality_error"] = lst.orthogonality_error()
        row["hermes_lst_rvq_reconstruction"] = [round(x, 4) for x in q.reconstruction_errors(lst.transform(X[:100_000]))]
        t = time.perf_counter()
        plain = ResidualQuantizer(codebook_size=256, seed=0).fit(X)
        row["hermes_plain_rvq_s"] = round(time.perf_counter() - t, 1)
        row["hermes_plain_rvq_reconstruction"] = [round(x, 4) for x in plain.reconstruction_errors(X[:100_000])]
        if n <= args.skip_sklearn_above:
            t = time.perf_counter()
            km = KMeans(n_clusters=256, n_init=1, max_iter=30, random_state=0).fit(X)
            row["sklearn_kmeans_1_stage_s"] = round(time.perf_counter() - t, 1)
            row["sklearn_kmeans_reconstruction"] = round(float(km.inertia_ / n), 4)
        row["lst_under_10_min"] = row["hermes_lst_rvq_s"] < 600
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"results": results,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}, indent=2))


if __name__ == "__main__":
    main()
