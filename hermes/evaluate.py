"""`hermes eval`: how good the code is, next to the obvious alternatives, on the same embeddings.

For a seeded sample of the store's documents (embeddings from the run's kept `embeddings/`, or
embedded again from the corpus with the substrate's settings), per level:

- effective number of cells exp(H), entropy H, Gini of cell sizes;
- mean cosine of a document to its cell's centroid, in the embedding space;
- Recall@10: the share of a document's 10 nearest neighbours (cosine, in the sample) in its cell;
- reconstruction error after each stage (mean squared residual norm, in the quantized space);

for the substrate ("hermes"), for a k-means-only RVQ fitted on the same sample with the same
codebook sizes ("plain_rvq"), and for flat k-means with as many cells as the level has
("kmeans"). With gold fields (read from the corpus by doc_id), NMI, ARI, homogeneity,
completeness and purity of each level's cells against each field (documents whose gold value is
missing or null are left out of that field's figures).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hermes.cellkeys import LEVELS, level_name
from hermes.errors import HermesError
from hermes.read import lookup
from hermes.store import connect, info_fields, label_count, labels_at, store_info
from hermes.vectors import unit_rows



# --------------------------------------------------------------------------- metrics

def cell_ids(codes: np.ndarray, level: int) -> np.ndarray:
    _, inv = np.unique(codes[:, :level], axis=0, return_inverse=True)
    return inv.ravel()


def gini(sizes: np.ndarray) -> float:
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def knn(E: np.ndarray, k: int = 10, chunk: int = 2048) -> np.ndarray:
    """Indices of each row's k nearest other rows by cosine (E unit-norm), brute force."""
    out = np.empty((len(E), k), dtype=np.int64)
    for i in range(0, len(E), chunk):
        sims = E[i:i + chunk] @ E.T
        sims[np.arange(len(sims)), np.arange(i, i + len(sims))] = -np.inf
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        out[i:i + chunk] = part
    return out


def structure_metrics(cells: np.ndarray, E: np.ndarray, neighbours: np.ndarray) -> dict[str, float]:
    sizes = np.bincount(cells)
    sizes = sizes[sizes > 0]
    p = sizes / sizes.sum()
    h = float(-(p * np.log(p)).sum())
    n_cells = int(cells.max()) + 1
    centroids = np.zeros((n_cells, E.shape[1]))
    np.add.at(centroids, cells, E)
    centroids = unit_rows(centroids)
    return {"cells": int(len(sizes)), "effective_cells": round(math.exp(h), 2), "entropy": round(h, 4),
            "gini": round(gini(sizes), 4),
            "mean_cos_to_centroid": round(float(np.einsum("ij,ij->i", E, centroids[cells]).mean()), 4),
            "recall_at_10": round(float((cells[neighbours] == cells[:, None]).mean()), 4)}


def gold_metrics(cells: np.ndarray, gold: list) -> dict[str, float] | None:
    from sklearn import metrics

    keep = np.array([g is not None for g in gold])
    if keep.sum() < 2:
        return None
    y = np.unique(np.array([str(g) for g, k in zip(gold, keep) if k]), return_inverse=True)[1]
    c = cells[keep]
    h, comp, _ = metrics.homogeneity_completeness_v_measure(y, c)
    cont = metrics.cluster.contingency_matrix(y, c)
    return {"docs": int(keep.sum()), "nmi": round(float(metrics.normalized_mutual_info_score(y, c)), 4),
            "ari": round(float(metrics.adjusted_rand_score(y, c)), 4),
            "homogeneity": round(float(h), 4), "completeness": round(float(comp), 4),
            "purity": round(float(cont.max(axis=0).sum() / cont.sum()), 4)}


# --------------------------------------------------------------------------- inputs

def _sample_rows(db: Path, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    con = connect(db)
    try:
        total = label_count(con)
        rows = np.arange(total) if total <= n else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        t = labels_at(con, rows)          # the sample's rows only, not every doc_id of the store
    finally:
        con.close()
    ids = t.column("doc_id").to_pylist()
    codes = np.stack([t.column(c).to_numpy().astype(np.int64) for c in ("c1", "c2", "c3")], axis=1)
    return ids, codes


# --------------------------------------------------------------------------- the evaluation

def evaluate(db: str | Path, gold: list[str] | None = None, sample: int = 20_000, seed: int = 0,
             corpus: list[str] | None = None, substrate: str | Path | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from hermes.layout import cached_embeddings
    from hermes.rvq import ResidualQuantizer, fit_codebook, assign
    from hermes.substrate import load_for_store

    db = Path(db)
    say = progress or (lambda m: None)
    sub = load_for_store(db, substrate)
    info = store_info(db)
    ids, codes = _sample_rows(db, sample, seed)
    gold = gold or []
    E = cached_embeddings(db.parent / "embeddings", ids)
    records = lookup(corpus or info.get("inputs", []), info_fields(info), set(ids), gold) \
        if (E is None or gold) else {}
    if E is None:
        missing = [d for d in ids if d not in records]
        if missing:
            raise HermesError(f"{len(missing):,} sampled documents are not in the corpus ({missing[0]}, ...)",
                              hint="pass the corpus with --corpus, or label with --keep-embeddings")
        say(f"eval: embedding {len(ids):,} documents (no kept embeddings found)")
        E = sub.embedder().encode([records[d]["text"] for d in ids])
    E = E.astype(np.float32)
    H = sub.transform.transform(E)               # as labeling does, from the embeddings as cached
    fixed = {i: codes[:, i].astype(np.int64) for i in sub.fixed}      # a fixed stage's codes are given
    if not np.array_equal(sub.quantizer.encode(H, fixed=fixed), codes):
        say("eval: note: re-encoding the sample does not give the stored codes exactly")
    E = unit_rows(E)

    say(f"eval: {len(ids):,} documents; neighbours, baselines")
    neighbours = knn(E)
    sizes = sub.quantizer.sizes_
    plain = ResidualQuantizer(stages=3, codebook_size=list(sizes), min_points_per_code=1, seed=seed).fit(E)
    plain_codes = plain.encode(E)
    rng = np.random.default_rng(seed)
    methods: dict[str, dict[int, np.ndarray]] = {"hermes": {}, "plain_rvq": {}, "kmeans": {}}
    for level in LEVELS:
        methods["hermes"][level] = cell_ids(codes, level)
        methods["plain_rvq"][level] = cell_ids(plain_codes, level)
        k = int(methods["hermes"][level].max()) + 1
        if progress:
            say(f"eval: flat k-means with {k:,} cells ({level_name(level)})")
        C = fit_codebook(E, min(k, len(E)), 20, rng)
        methods["kmeans"][level] = assign(E, C)[0]
    result: dict[str, Any] = {"store": str(db), "substrate": sub.fingerprint, "sample": len(ids), "seed": seed,
                              "levels": {}, "reconstruction": {}, "gold": {}}
    for level in LEVELS:
        result["levels"][level_name(level)] = {m: structure_metrics(methods[m][level], E, neighbours)
                                                for m in methods}
    result["reconstruction"] = {"hermes": [round(x, 5) for x in sub.quantizer.reconstruction_errors(H, codes)],
                                "plain_rvq": [round(x, 5) for x in plain.reconstruction_errors(E)]}
    for g in gold:
        values = [records.get(d, {}).get(g) for d in ids]
        if all(v is None for v in values):
            raise HermesError(f"gold field '{g}' is in none of the sampled records", hint="check --gold")
        result["gold"][g] = {level_name(level): {m: gold_metrics(methods[m][level], values) for m in methods}
                             for level in LEVELS}
    return result
