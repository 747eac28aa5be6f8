"""`hermes report`: one self-contained HTML page (no network) of a store and its mixtures.

The page holds aggregates only (plus a few snippets per L1 cell): the corpus summary, the
hierarchy as a zoomable treemap (L1 -> L12 -> L123, sized by tokens, coloured by mean quality,
named by top terms), per-level size distributions and `top:0.3` candidate pools, and for each
mixture its L1 weights beside natural and its diagnostics. L123 cells are stored compactly
(code, tokens, quality) and drawn only inside the L12 cell that is opened, so a 130k-cell store
stays a few MB.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hermes.errors import HermesError
from hermes.files import write_text
from hermes.read import lookup
from hermes.store import connect, info_fields, store_info

SNIPPETS_PER_CELL = 3
SNIPPET_CHARS = 240
CURVE_POINTS = 400


def _rows(con, sql: str) -> list[dict]:
    t = con.sql(sql).to_arrow_table()
    return t.to_pylist()


def _level_stats(con, view: str) -> dict[str, Any]:
    sizes = np.array([r["n_tokens"] for r in _rows(con, f"SELECT n_tokens FROM {view} ORDER BY n_tokens DESC")],
                     dtype=np.float64)
    share = sizes / sizes.sum()
    h = float(-(share[share > 0] * np.log(share[share > 0])).sum())
    x = np.sort(sizes)
    n = len(x)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum())) if n else 0.0
    idx = np.unique(np.linspace(0, n - 1, min(n, CURVE_POINTS)).astype(int))
    return {"cells": n, "effective_cells": round(float(np.exp(h)), 1), "gini": round(gini, 3),
            "curve": [[int(i) + 1, round(float(share[i]), 6)] for i in idx]}


def _pools(con, level: int) -> dict[str, Any]:
    codes = ", ".join(f"c{i + 1}" for i in range(level))
    rows = _rows(con, f"""
        WITH q AS (SELECT {codes}, quantile_cont(quality, 0.7) AS p70 FROM labels GROUP BY {codes})
        SELECT count(*) FILTER (WHERE l.quality >= q.p70) AS eligible
        FROM labels l JOIN q USING ({codes}) GROUP BY {codes}""")
    if not rows:
        return {}
    e = np.array([r["eligible"] for r in rows], dtype=np.float64)
    return {"median": float(np.median(e)), "p10": float(np.percentile(e, 10)),
            "share_under_30": round(float((e < 30).mean()), 3)}


def gather(db: str | Path, mixtures: list[str | Path] = (), corpus: list[str] | None = None) -> dict[str, Any]:
    db = Path(db)
    info = store_info(db)
    con = connect(db)
    try:
        totals = _rows(con, "SELECT count(*) AS docs, sum(n_tokens) AS tokens, count(quality) AS with_quality "
                            "FROM labels")[0]
        rejects = _rows(con, "SELECT reason, count(*) AS n FROM rejects GROUP BY reason ORDER BY n DESC LIMIT 20")
        n_rejects = _rows(con, "SELECT count(*) AS n FROM rejects")[0]["n"]
        sub = _rows(con, "SELECT * FROM substrates")[0]
        l1 = _rows(con, """SELECT v.c1, v.cell, v.n_docs, v.n_tokens, v.quality_mean AS q, t.terms
                           FROM cells_l1 v LEFT JOIN cell_terms t ON t.level = 1 AND t.cell = v.cell ORDER BY v.c1""")
        l2 = _rows(con, """SELECT v.c1, v.c2, v.cell, v.n_docs, v.n_tokens, v.quality_mean AS q,
                                  array_to_string(list_slice(string_split(t.terms, ', '), 1, 3), ', ') AS terms
                           FROM cells_l12 v LEFT JOIN cell_terms t ON t.level = 2 AND t.cell = v.cell
                           ORDER BY v.c1, v.c2""")
        l3 = _rows(con, "SELECT c1, c2, c3, cell, parent, n_docs, n_tokens, quality_mean AS q FROM cells_l123 "
                        "ORDER BY c1, c2, c3")
        levels = {name: {**_level_stats(con, f"cells_{key}"), "pools_top_0.3": _pools(con, lv)}
                  for lv, (name, key) in enumerate((("L1", "l1"), ("L12", "l12"), ("L123", "l123")), start=1)}
        picks = _rows(con, f"""SELECT c1, doc_id FROM (SELECT c1, doc_id, row_number() OVER
                                (PARTITION BY c1 ORDER BY hash(doc_id)) AS r FROM labels) WHERE r <= {SNIPPETS_PER_CELL}""")
    finally:
        con.close()

    def q(v):
        return None if v is None else round(float(v), 3)

    tree: dict[int, dict] = {}
    l1_key = {r["c1"]: r["cell"] for r in l1}
    root = {r["cell"]: l1_key[r["c1"]] for r in l1 + l2 + l3}     # any cell -> its L1 cell
    for r in l1:
        tree[r["c1"]] = {"k": r["cell"], "t": int(r["n_tokens"]), "d": int(r["n_docs"]), "q": q(r["q"]),
                         "w": r["terms"] or "", "c": {}}
    for r in l2:
        tree[r["c1"]]["c"][r["c2"]] = {"k": r["cell"], "t": int(r["n_tokens"]), "d": int(r["n_docs"]),
                                       "q": q(r["q"]), "w": r["terms"] or "", "c": []}
    for r in l3:     # compact: [last key segment (c3, or its class name), tokens, docs, quality]
        last = r["cell"][len(r["parent"]) + 1:]
        tree[r["c1"]]["c"][r["c2"]]["c"].append([int(last) if last.isdigit() else last, int(r["n_tokens"]),
                                                 int(r["n_docs"]), q(r["q"])])
    hierarchy = [{**v, "c": list(v["c"].values())} for v in tree.values()]

    snippets: dict[str, list[str]] = {}
    note = None
    try:
        found = lookup(corpus or info.get("inputs", []), info_fields(info), {p["doc_id"] for p in picks})
        for p in picks:
            text = (found.get(p["doc_id"]) or {}).get("text")
            if isinstance(text, str):
                snippets.setdefault(l1_key[p["c1"]], []).append(" ".join(text.split())[:SNIPPET_CHARS])
    except HermesError as e:
        note = f"snippets unavailable: {e.message}"

    mixes = []
    for m in mixtures:
        mixes.append(_mixture(Path(m), {r["cell"]: r["n_tokens"] / totals["tokens"] for r in l1}, root))
    return {"store": str(db), "totals": totals, "rejects": rejects, "n_rejects": n_rejects,
            "substrate": {k: (json.loads(v) if k in ("embedding", "transform", "rvq", "stages") else str(v))
                          for k, v in sub.items()},
            "info": {k: v for k, v in info.items()}, "hierarchy": hierarchy, "levels": levels,
            "snippets": snippets, "snippet_note": note, "mixtures": mixes}


def _mixture(path: Path, natural: dict[str, float], root: dict[str, str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    if not (path / "mixture.json").is_file() or not (path / "weights.parquet").is_file():
        raise HermesError(f"{path}: not a mixture folder (no mixture.json or weights.parquet)",
                          hint="pass folders written by `hermes mix`")
    spec = json.loads((path / "mixture.json").read_text())
    w = pq.read_table(path / "weights.parquet", columns=["cell", "selected_tokens"]).to_pylist()
    total = sum(r["selected_tokens"] for r in w) or 1
    l1: dict[str, float] = {}
    for r in w:
        key = root.get(r["cell"], r["cell"])
        l1[key] = l1.get(key, 0.0) + r["selected_tokens"] / total
    return {"name": path.name, "spec": spec["spec"], "diagnostics": spec["diagnostics"],
            "warnings": spec.get("warnings", []),
            "l1": [[k, round(natural.get(k, 0.0), 6), round(l1.get(k, 0.0), 6)] for k in natural]}


def render(data: dict[str, Any]) -> str:
    template = resources.files("hermes").joinpath("templates", "report.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), default=str).replace("</", "<\\/")
    return template.replace("/*DATA*/null", payload).replace("{{title}}", html.escape(Path(data["store"]).name))


def report(db: str | Path, out: str | Path, mixtures: list[str | Path] = (), corpus: list[str] | None = None
           ) -> dict[str, Any]:
    data = gather(db, mixtures, corpus)
    page = render(data)
    out = Path(out)
    write_text(out, page)
    return {"out": str(out), "bytes": len(page.encode()), "l1_cells": len(data["hierarchy"]),
            "mixtures": len(data["mixtures"])}
