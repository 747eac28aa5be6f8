"""How exactly mixtures meet their budgets, over seeds, on a real store.

For each spec (the issue's natural mixtures at 200k tokens, to L1 and to L12, and the README's
quickstart mixture), over `--seeds` seeds, with the current draw and, as the baseline in the same
run, the previous one (a prefix in priority order, then an independent coin per cell for the
document that straddles its target):
- `budget_error`: |selected - budget| / budget (max and mean over seeds);
- `cells_within_one_doc`: the share of runs in which every level-M cell is within one of its own
  documents of its target;
- `tv_l1`: TV distance of the mixture's L1 token shares to its Stage-1 weights (max over seeds);
- `mean_error_l1`: per L1 cell, |mean over seeds of its selected tokens - its target| / target,
  the largest over cells whose target is at least 50 documents;
- `median_pool`: the median eligible documents per level-M cell with a target.
Prints JSON.

    python scripts/bench_mix.py --db out/labels.duckdb --seeds 20
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import numpy as np

from hermes import mixers
from hermes.mixers import MixSpec, make_mixture
from hermes.mixture import load_docs

SPECS = [
    {"rule": "natural", "to_level": 1, "budget_tokens": 200_000},
    {"rule": "natural", "to_level": 2, "budget_tokens": 200_000},
    {"rule": "uniform", "to_level": 2, "eligible": "top:0.3", "budget_tokens": 200_000},
]


def previous_draw(cell, eligible, tokens, prio, targets, rng, group=None):
    """The draw before budgets were balanced: a prefix in priority order, then the document that
    straddles the target on its own coin per cell."""
    idx, cc, tt, full, rest, before = mixers.passes(cell, eligible, tokens, prio, targets)
    r = rest[cc]
    fits = before + tt <= r + 1e-9
    straddles = ~fits & (before < r)
    frac = np.divide(r - before, tt, out=np.zeros_like(tt), where=tt > 0)
    take = fits | (straddles & (rng.random(len(tt)) < frac))
    out = np.zeros(len(cell), dtype=np.int64)
    out[idx] = (full[cc] + take).astype(np.int64)
    return out


@contextmanager
def previous():
    kept = mixers.draw
    mixers.draw = previous_draw
    try:
        yield
    finally:
        mixers.draw = kept


def measure(docs, spec: dict, seeds: int) -> dict:
    errors, within, tvs, per_l1 = [], [], [], []
    for seed in range(seeds):
        mix = make_mixture(docs, MixSpec(seed=seed, **spec))
        c = mix.cells
        sel = c["selected_tokens"]
        errors.append(abs(sel.sum() - spec["budget_tokens"]) / spec["budget_tokens"])
        keys = docs.keys(mix.spec.draw_level)
        uniq, inv = np.unique(keys, return_inverse=True)
        biggest = np.zeros(len(uniq))
        np.maximum.at(biggest, inv, docs.n_tokens)
        biggest = biggest[np.searchsorted(uniq, c["key"])]
        within.append(bool(np.all(np.abs(sel - c["target_tokens"]) <= biggest)))
        l1_sel = np.bincount(c["parent"], weights=sel) if mix.spec.level == 1 else None
        l1_target = np.bincount(c["parent"], weights=c["target_tokens"])
        tvs.append(0.5 * float(np.abs(l1_sel / l1_sel.sum() - l1_target / l1_target.sum()).sum()))
        per_l1.append(l1_sel)
    mean = np.mean(per_l1, axis=0)
    big = l1_target >= 50 * np.median(docs.n_tokens)
    mean_err = float(np.max(np.abs(mean - l1_target)[big] / l1_target[big])) if big.any() else None
    return {"budget_error_max": round(max(errors), 4), "budget_error_mean": round(float(np.mean(errors)), 4),
            "cells_within_one_doc": round(float(np.mean(within)), 3), "tv_l1_max": round(max(tvs), 4),
            "mean_error_l1": None if mean_err is None else round(mean_err, 4),
            "l1_cells_with_50_docs": int(big.sum()),
            "median_pool": mix.diagnostics["pool"]["median_eligible_docs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    docs, _ = load_docs(args.db)
    out = {"db": args.db, "docs": len(docs), "tokens": int(docs.n_tokens.sum()), "seeds": args.seeds,
           "cells": {f"L{'123'[:lv]}": int(len(np.unique(docs.keys(lv)))) for lv in (1, 2, 3)}, "specs": []}
    for spec in SPECS:
        row = {"spec": MixSpec(**spec).name(), "budget_tokens": spec["budget_tokens"],
               "current": measure(docs, spec, args.seeds)}
        with previous():
            row["previous"] = measure(docs, spec, args.seeds)
        out["specs"].append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
