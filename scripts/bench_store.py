"""Benchmark the store's views and one mixture over a large synthetic label table.

Builds a DuckDB store of N label rows (default 10M) with a realistic hierarchy (256 L1 cells with
Zipf-like sizes, up to 256 children each, lognormal token counts, uniform quality), then times
- each granularity view (`SELECT * FROM cells_l1`, `cells_l12`, `cells_l123`, fully read);
- one mixture (`hermes mix`: uniform at L1, equal down to L12, top:0.3, budget = 10% of tokens),
  from loading the label arrays to the written folder;
and, as the baseline in the same run, a plain DuckDB scan of the same table (`SELECT count(*),
sum(n_tokens) FROM labels`). Prints JSON.

    python scripts/bench_store.py --rows 10000000 --workdir /tmp/bench-store
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import duckdb

from hermes import api
from hermes.store import create_views


def build(db: Path, rows: int, seed: int) -> float:
    t = time.perf_counter()
    con = duckdb.connect(str(db))
    con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
    # c1 Zipf-like over 256 cells, c2 and c3 skewed within; tokens lognormal; quality uniform
    con.execute(f"""
        CREATE TABLE labels AS
        SELECT 'doc-' || i AS doc_id, 'synthetic' AS source,
               CAST(n_tok * 4 AS INTEGER) AS n_chars, CAST(n_tok AS INTEGER) AS n_tokens,
               random() AS quality,
               CAST(floor(256 * pow(random(), 2.0)) AS SMALLINT) AS c1,
               CAST(floor(256 * pow(random(), 3.0)) AS SMALLINT) AS c2,
               CAST(floor(256 * pow(random(), 3.0)) AS SMALLINT) AS c3,
               'synthetic0000000' AS substrate
        FROM (SELECT i, greatest(1, exp(6 + 1.0 * sqrt(-2 * ln(random())) * cos(2 * pi() * random()))) AS n_tok
              FROM range({rows}) t(i))""")
    con.execute("CREATE TABLE rejects (file VARCHAR, line BIGINT, doc_id VARCHAR, reason VARCHAR)")
    con.execute("CREATE TABLE store_info (key VARCHAR, value VARCHAR)")
    con.execute("INSERT INTO store_info VALUES ('inputs', '[]'), ('fields', '{}')")
    create_views(con)
    con.close()
    return time.perf_counter() - t


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hermes-bench-store"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    db = args.workdir / "labels.duckdb"
    build_s = build(db, args.rows, args.seed)

    con = duckdb.connect(str(db), read_only=True)
    baseline = timed(lambda: con.execute("SELECT count(*), sum(n_tokens) FROM labels").fetchall())
    views = {}
    for name in ("cells_l1", "cells_l12", "cells_l123"):
        n_cells = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]
        views[name] = {"cells": n_cells,
                       "seconds": round(timed(lambda: con.sql(f"SELECT * FROM {name}").to_arrow_table()), 3)}
    total_tokens = con.execute("SELECT sum(n_tokens) FROM labels").fetchall()[0][0]
    con.close()

    t = time.perf_counter()
    d = api.mix(db, args.workdir / "mixture", rule="uniform", to_level=2, sampler="equal", eligible="top:0.3",
                budget_tokens=int(total_tokens) // 10, seed=1)
    mix_s = time.perf_counter() - t
    print(json.dumps({
        "rows": args.rows, "build_seconds": round(build_s, 1),
        "baseline_scan_seconds": round(baseline, 3),
        "views": views, "views_under_1s": all(v["seconds"] < 1 for v in views.values()),
        "mixture": {"seconds": round(mix_s, 2), "under_30s": mix_s < 30,
                    "spec": "uniform L1 -> equal L12, top:0.3, budget 10% of tokens",
                    "unique_docs": d["diagnostics"]["unique_docs"],
                    "selected_tokens": d["diagnostics"]["selected_tokens"],
                    "budget_tokens": d["diagnostics"]["budget_tokens"]},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
