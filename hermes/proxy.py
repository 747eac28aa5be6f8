"""The proxy-experiment loop (RegMix style).

1. `propose`: N candidate Stage-1 weightings of the level-L cells, Dirichlet draws around the
   natural distribution with concentrations from tight to loose, of which the N most spread out
   (greedy farthest-point by total variation) are kept; candidate 0 is natural itself. Each is a
   weights file that `--rule weights:FILE` accepts.
2. The user trains a small proxy model on each candidate mixture and measures a loss.
3. `optimize`: fits a regression from weights to loss (scikit-learn), reports its cross-validated
   held-out error, searches the simplex with many Dirichlet draws, and writes the mean of the
   predicted-best draws as a weights file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from hermes.errors import HermesError

MODELS = ("ridge", "gbm")


def dirichlet_around(p: np.ndarray, n: int, rng: np.random.Generator,
                     log10_conc: tuple[float, float] = (-0.5, 1.5)) -> np.ndarray:
    """n draws from Dir(a * p), a = K * 10^U(lo, hi): small a spreads far from p, large a stays close."""
    k = len(p)
    alphas = k * 10 ** rng.uniform(*log10_conc, size=n)
    g = rng.gamma(np.maximum(alphas[:, None] * p[None, :], 1e-6))
    w = g / g.sum(axis=1, keepdims=True)
    return np.nan_to_num(w, nan=1.0 / k)


def spread_out(pool: np.ndarray, n: int, start: np.ndarray) -> np.ndarray:
    """Greedy farthest-point selection (total variation), starting from `start`."""
    chosen = [start]
    dmin = 0.5 * np.abs(pool - start).sum(axis=1)
    for _ in range(n - 1):
        i = int(np.argmax(dmin))
        chosen.append(pool[i])
        dmin = np.minimum(dmin, 0.5 * np.abs(pool - pool[i]).sum(axis=1))
    return np.stack(chosen)


def write_weights(path: Path, cells: list[str], w: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["cell", "weight"])
        for c, x in zip(cells, w):
            wr.writerow([c, f"{x:.10g}"])


def propose(cells: list[str], natural: np.ndarray, n: int, out: Path, level: int, seed: int = 0,
            store: str = "", substrate: str = "") -> dict[str, Any]:
    if n < 2:
        raise HermesError(f"--n {n}: propose at least 2 candidates")
    p = np.asarray(natural, dtype=np.float64)
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    cand = spread_out(dirichlet_around(p, 20 * n, rng), n, p)
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates").mkdir(exist_ok=True)
    rows = []
    for i, w in enumerate(cand):
        name = f"cand-{i:03d}"
        write_weights(out / "candidates" / f"{name}.csv", cells, w)
        h = -(w[w > 0] * np.log(w[w > 0])).sum()
        rows.append({"candidate": name, "file": f"candidates/{name}.csv",
                     "tv_to_natural": round(0.5 * float(np.abs(w - p).sum()), 4),
                     "effective_cells": round(float(np.exp(h)), 2)})
    meta = {"level": level, "cells": cells, "natural": p.tolist(), "seed": seed, "store": store,
            "substrate": substrate, "candidates": rows}
    (out / "candidates.json").write_text(json.dumps(meta, indent=1) + "\n")
    with open(out / "losses.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["candidate", "loss"])
        for r in rows:
            wr.writerow([r["candidate"], ""])
    return {"out": str(out), "level": level, "n": n, "cells": len(cells), "candidates": rows,
            "losses_template": str(out / "losses.csv")}


def read_losses(path: Path, known: set[str]) -> dict[str, float]:
    if not path.is_file():
        raise HermesError(f"{path}: losses file not found", hint="a CSV with columns candidate, loss")
    out: dict[str, float] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"candidate", "loss"} <= set(reader.fieldnames):
            raise HermesError(f"{path}:1: the header must name the columns candidate and loss "
                              f"(found: {', '.join(reader.fieldnames or [])})")
        for r in reader:
            line = reader.line_num
            if not (r["loss"] or "").strip():
                continue          # a candidate not run (yet)
            if r["candidate"] not in known:
                raise HermesError(f"{path}:{line}: unknown candidate '{r['candidate']}' (field 'candidate')",
                                  hint=f"candidates are {', '.join(sorted(known)[:4])}, ...")
            try:
                value = float(r["loss"])
            except ValueError:
                raise HermesError(f"{path}:{line}: loss {r['loss']!r} is not a number (field 'loss')") from None
            if not np.isfinite(value):
                raise HermesError(f"{path}:{line}: loss is not finite (field 'loss')")
            out[r["candidate"]] = value
    return out


def _model(kind: str, seed: int):
    if kind == "ridge":
        from sklearn.linear_model import RidgeCV

        return RidgeCV(alphas=np.logspace(-4, 2, 13))
    if kind == "gbm":
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(n_estimators=200, max_depth=2, learning_rate=0.05, subsample=0.8,
                                         random_state=seed)
    raise HermesError(f"unknown model '{kind}'", hint=f"valid models: {', '.join(MODELS)}")


def optimize(candidates_dir: Path, losses: Path, out: Path, model: str = "ridge", n_search: int = 100_000,
             top_k: int = 100, seed: int = 0) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold, cross_val_predict

    meta_path = candidates_dir / "candidates.json"
    if not meta_path.is_file():
        raise HermesError(f"{meta_path}: missing; {candidates_dir} is not a folder from `hermes propose`")
    meta = json.loads(meta_path.read_text())
    cells = meta["cells"]
    names = [r["candidate"] for r in meta["candidates"]]
    measured = read_losses(losses, set(names))
    if len(measured) < 5:
        raise HermesError(f"{losses}: {len(measured)} losses; the regression needs at least 5",
                          hint="run more proxy models and fill in their losses")
    W = []
    for name in measured:
        with open(candidates_dir / "candidates" / f"{name}.csv", newline="") as f:
            w = {r["cell"]: float(r["weight"]) for r in csv.DictReader(f)}
        W.append([w.get(c, 0.0) for c in cells])
    X, y = np.array(W), np.array(list(measured.values()))
    est = _model(model, seed)
    folds = min(5, len(y))
    pred = cross_val_predict(est, X, y, cv=KFold(folds, shuffle=True, random_state=seed))
    cv = {"folds": folds, "mae": float(np.mean(np.abs(pred - y))),
          "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
          "spearman": float(spearmanr(pred, y).statistic) if len(set(y)) > 1 else None,
          "loss_std": float(np.std(y))}
    est.fit(X, y)
    rng = np.random.default_rng(seed)
    natural = np.asarray(meta["natural"])
    search = dirichlet_around(natural, n_search, rng)
    scores = est.predict(search)
    best = search[np.argsort(scores)[:top_k]].mean(axis=0)
    best /= best.sum()
    predicted = float(est.predict(best[None, :])[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_weights(out, cells, best)
    report = {"weights": str(out), "level": meta["level"], "model": model, "n_losses": len(y),
              "held_out": cv, "predicted_loss": predicted, "best_measured": {"candidate": list(measured)[int(np.argmin(y))], "loss": float(y.min())},
              "tv_to_natural": round(0.5 * float(np.abs(best - natural).sum()), 4)}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report
