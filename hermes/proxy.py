"""The proxy-experiment loop (RegMix style).

1. `propose`: N candidate Stage-1 weightings of the level-L cells, Dirichlet draws around the
   natural distribution with concentrations from tight to loose, of which the N most spread out
   (greedy farthest-point by total variation) are kept; candidate 0 is natural itself. Each is a
   weights file that `--rule weights:FILE` accepts.
2. The user trains a small proxy model on each candidate mixture and measures a loss.
3. `optimize`: fits a regression from weights to loss (scikit-learn), reports its cross-validated
   held-out error, searches the simplex with many Dirichlet draws, and writes the mean of the
   predicted-best draws as a weights file. The runs come from a `propose` folder and its
   losses.csv, or from two tables joined on a run id (weights by domain or cell; losses by
   metric), as RegMix published its proxy runs. `rank` scores planned mixtures with the fitted
   model and, given their measured losses, reports the held-out rank correlation.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hermes.errors import HermesError
from hermes.files import replacing, write_json

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
    with replacing(path) as (tmp,), open(tmp, "w", newline="") as f:
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


def _read_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, row)]) of a CSV file; a missing file or an empty header is an error."""
    if not path.is_file():
        raise HermesError(f"{path}: {what} file not found")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise HermesError(f"{path}:1: no header row", hint=f"the {what} file starts with a header of column names")
        rows = [(reader.line_num, r) for r in reader if any(x.strip() for x in r)]
    return [h.strip() for h in header], rows


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise HermesError(f"{path}:{line}: {text!r} is not a number (column '{column}')") from None
    if not np.isfinite(value):
        raise HermesError(f"{path}:{line}: {text.strip()} is not finite (column '{column}')")
    return value


def _column(path: Path, header: list[str], name: str, role: str) -> int:
    if name not in header:
        raise HermesError(f"{path}:1: no column '{name}' ({role})",
                          hint=f"the columns are {', '.join(header[:6])}{', ...' if len(header) > 6 else ''}")
    return header.index(name)


@dataclass
class Mixtures:
    """Mixture weights by run: rows of X (each row sums to 1) over `columns`, one per run."""

    runs: list[str]
    columns: list[str]
    X: np.ndarray


def read_mixtures(path: Path, run_column: str | None = None, columns: list[str] | None = None) -> Mixtures:
    """A weights table: the run id column (`run_column`, default the first), then one weight per
    domain or cell. With `columns`, the table must have exactly those weight columns (any order).
    Each row is scaled to sum to 1; negative, non-numeric or all-zero rows are errors."""
    header, rows = _read_csv(path, "weights")
    r = _column(path, header, run_column, "the run id") if run_column else 0
    names = [h for i, h in enumerate(header) if i != r]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise HermesError(f"{path}:1: column '{twice[0]}' appears more than once")
    if not names:
        raise HermesError(f"{path}:1: no weight columns besides the run id '{header[r]}'")
    if columns is not None:
        missing = [c for c in columns if c not in names]
        extra = [c for c in names if c not in columns]
        if missing or extra:
            what = f"no column '{missing[0]}'" if missing else f"column '{extra[0]}' is not in the fitted weights"
            raise HermesError(f"{path}:1: {what}", hint="rank mixtures in the same columns as --weights")
    order = columns or names
    at = [header.index(c) for c in order]
    runs, X, seen = [], np.zeros((len(rows), len(order))), {}
    for i, (line, row) in enumerate(rows):
        if len(row) != len(header):
            raise HermesError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        run = row[r].strip()
        if run in seen:
            raise HermesError(f"{path}:{line}: run '{run}' also on line {seen[run]} (column '{header[r]}')")
        seen[run] = line
        for j, c in enumerate(at):
            X[i, j] = _number(path, line, header[c], row[c])
            if X[i, j] < 0:
                raise HermesError(f"{path}:{line}: weight {X[i, j]:g} is negative (column '{header[c]}')")
        if not X[i].sum() > 0:
            raise HermesError(f"{path}:{line}: every weight of run '{run}' is 0")
        runs.append(run)
    if not runs:
        raise HermesError(f"{path}: no runs")
    return Mixtures(runs, list(order), X / X.sum(axis=1, keepdims=True))


def read_loss_table(path: Path, target: str, runs: list[str], weights_path: Path,
                    run_column: str | None = None, require_all: bool = True) -> dict[str, float]:
    """The `target` loss by run from a losses table joined on the run id (`run_column`, default the
    first column). A run that is not in `runs`, a non-finite loss, or (with `require_all`) a run of
    the weights table with no row here is an error naming the file, line and column."""
    header, rows = _read_csv(path, "losses")
    r = _column(path, header, run_column, "the run id") if run_column else 0
    t = _column(path, header, target, "--target")
    known = set(runs)
    out: dict[str, float] = {}
    for line, row in rows:
        if len(row) != len(header):
            raise HermesError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        run = row[r].strip()
        if run not in known:
            raise HermesError(f"{path}:{line}: run '{run}' is not in {weights_path} (column '{header[r]}')")
        if run in out:
            raise HermesError(f"{path}:{line}: run '{run}' has a second loss (column '{header[r]}')")
        out[run] = _number(path, line, target, row[t])
    if require_all:
        missing = [x for x in runs if x not in out]
        if missing:
            raise HermesError(f"{path}: no loss for run '{missing[0]}' of {weights_path}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}",
                              hint="the two tables must list the same runs")
    return out


def read_losses(path: Path, known: set[str]) -> dict[str, float]:
    """The losses.csv of a `propose` folder: columns candidate, loss; an empty loss is a run not done yet."""
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
                raise HermesError(f"{path}:{line}: unknown candidate '{r['candidate']}' (column 'candidate')",
                                  hint=f"candidates are {', '.join(sorted(known)[:4])}, ...")
            out[r["candidate"]] = _number(path, line, "loss", r["loss"])
    return out


def candidate_runs(candidates_dir: Path, losses: Path) -> tuple[Mixtures, np.ndarray, dict[str, Any]]:
    """The measured candidates of a `propose` folder: (their mixtures, losses, the folder's metadata)."""
    meta_path = candidates_dir / "candidates.json"
    if not meta_path.is_file():
        raise HermesError(f"{meta_path}: missing; {candidates_dir} is not a folder from `hermes propose`")
    meta = json.loads(meta_path.read_text())
    cells = meta["cells"]
    measured = read_losses(losses, {r["candidate"] for r in meta["candidates"]})
    W = []
    for name in measured:
        with open(candidates_dir / "candidates" / f"{name}.csv", newline="") as f:
            w = {r["cell"]: float(r["weight"]) for r in csv.DictReader(f)}
        W.append([w.get(c, 0.0) for c in cells])
    X = np.array(W).reshape(len(W), len(cells))
    return Mixtures(list(measured), cells, X), np.array(list(measured.values())), meta


def table_runs(weights: Path, losses: Path, target: str, run_column: str | None = None
               ) -> tuple[Mixtures, np.ndarray]:
    """Published or own proxy runs as two tables joined on the run id: (mixtures, target losses)."""
    mix = read_mixtures(weights, run_column)
    loss = read_loss_table(losses, target, mix.runs, weights, run_column)
    return mix, np.array([loss[r] for r in mix.runs])


def _model(kind: str, seed: int):
    if kind == "ridge":
        from sklearn.linear_model import RidgeCV

        return RidgeCV(alphas=np.logspace(-4, 2, 13))
    if kind == "gbm":
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(n_estimators=200, max_depth=2, learning_rate=0.05, subsample=0.8,
                                         random_state=seed)
    raise HermesError(f"unknown model '{kind}'", hint=f"valid models: {', '.join(MODELS)}")


def _spearman(pred: np.ndarray, y: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    return float(spearmanr(pred, y).statistic) if len(set(y)) > 1 and len(set(pred)) > 1 else None


def fit(mix: Mixtures, y: np.ndarray, model: str = "ridge", seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The regression loss ~ weights on all runs, and its cross-validated held-out error."""
    from sklearn.model_selection import KFold, cross_val_predict

    if len(y) < 5:
        raise HermesError(f"{len(y)} measured run{'' if len(y) == 1 else 's'}; the regression needs at least 5",
                          hint="run more proxy models and fill in their losses")
    est = _model(model, seed)
    folds = min(5, len(y))
    pred = cross_val_predict(est, mix.X, y, cv=KFold(folds, shuffle=True, random_state=seed))
    cv = {"folds": folds, "mae": float(np.mean(np.abs(pred - y))),
          "rmse": float(np.sqrt(np.mean((pred - y) ** 2))), "spearman": _spearman(pred, y),
          "loss_std": float(np.std(y))}
    return est.fit(mix.X, y), cv


def search(est, center: np.ndarray, n_search: int, top_k: int, seed: int) -> tuple[np.ndarray, float]:
    """The mean of the `top_k` predicted-best of `n_search` Dirichlet draws around `center`."""
    rng = np.random.default_rng(seed)
    draws = dirichlet_around(center, n_search, rng)
    best = draws[np.argsort(est.predict(draws))[:top_k]].mean(axis=0)
    best /= best.sum()
    return best, float(est.predict(best[None, :])[0])


def rank(est, mix: Mixtures, out: Path, measured: dict[str, float] | None = None) -> dict[str, Any]:
    """Write `run,predicted_loss` for every mixture, best predicted first; with measured losses of the
    same runs, how well the prediction ranks them (Spearman) and where the predicted best really stands."""
    pred = est.predict(mix.X)
    order = np.argsort(pred, kind="stable")
    with replacing(out) as (tmp,), open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["run", "predicted_loss"])
        for i in order:
            wr.writerow([mix.runs[i], f"{pred[i]:.10g}"])
    rep: dict[str, Any] = {"file": str(out), "runs": len(mix.runs),
                           "best_predicted": {"run": mix.runs[int(order[0])], "predicted_loss": float(pred[order[0]])}}
    if measured is not None:
        y = np.array([measured[r] for r in mix.runs])
        best = int(order[0])
        rep["held_out"] = {"spearman": _spearman(pred, y),
                           "pearson": float(np.corrcoef(pred, y)[0, 1]) if np.std(pred) > 0 and np.std(y) > 0 else None}
        rep["best_predicted"].update({"measured_loss": float(y[best]),
                                      "measured_rank": int(1 + np.sum(y < y[best])),
                                      "best_measured_loss": float(y.min())})
    return rep


def optimize(mix: Mixtures, y: np.ndarray, out: Path, center: np.ndarray | None = None, model: str = "ridge",
             n_search: int = 100_000, top_k: int = 100, seed: int = 0, level: int | None = None,
             rank_mixtures: tuple[Path, Path, Path | None, str | None, str | None] | None = None) -> dict[str, Any]:
    """Fit loss ~ weights on the runs, search the simplex around `center` (default: the mean of the
    runs' mixtures), write the predicted-best mixture as a weights file (with a .json report).

    `rank_mixtures` = (mixtures CSV, output CSV, its measured losses CSV or None, target, run id column
    or None): rank those mixtures with the fitted model, and with measured losses report the held-out
    rank correlation."""
    ranked = None
    if rank_mixtures is not None:      # read (and check) everything before anything is written
        m_path, r_out, m_losses, target, run_column = rank_mixtures
        ranked = read_mixtures(m_path, run_column, columns=mix.columns)
        measured = read_loss_table(m_losses, target, ranked.runs, m_path, run_column) if m_losses else None
    est, cv = fit(mix, y, model, seed)
    center_name = "natural" if center is not None else "mean of the runs"
    center = mix.X.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    best, predicted = search(est, center, n_search, top_k, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_weights(out, mix.columns, best)
    report = {"weights": str(out), "level": level, "model": model, "n_losses": int(len(y)),
              "held_out": cv, "predicted_loss": predicted,
              "best_measured": {"run": mix.runs[int(np.argmin(y))], "loss": float(y.min())},
              "search_center": center_name, "tv_to_center": round(0.5 * float(np.abs(best - center).sum()), 4)}
    if ranked is not None:
        report["rank"] = rank(est, ranked, r_out, measured)
    write_json(out.with_suffix(".json"), report, indent=2)
    return report
