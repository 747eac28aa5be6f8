"""Mixtures against a store: read weights files, write mixture folders (shared by `hermes mix`,
which draws cell by cell: hermes.streaming), and the in-memory mixture (`load_docs`, `build`,
`write`: every label loaded into arrays), the reference the streamed one is tested against and
what scripts/bench_mix.py draws from.

A mixture folder holds
- `weights.parquet`: one row per level-M cell: cell, parent (its level-L cell), stage1_weight,
  weight, target/available/selected tokens, eligible_docs, quality_threshold, epochs;
- `manifest.parquet`: doc_id, repeats (and n_tokens, cell), the documents to train on;
- `mixture.json`: the spec, the store and substrate fingerprint, diagnostics and warnings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hermes._version import __version__
from hermes.errors import HermesError
from hermes.files import replacing
from hermes.cellkeys import key_sql, key_text, level_name, parent_keys
from hermes.mixers import Docs, Mixture, MixSpec, make_mixture, parse_rule
from hermes.store import connect, stage_names


def store_substrate(con) -> str:
    fps = [r[0] for r in con.execute("SELECT DISTINCT substrate FROM labels").fetchall()]
    if len(fps) > 1:
        raise HermesError(f"the store mixes labels of {len(fps)} substrates ({', '.join(sorted(fps))}; "
                          f"field 'substrate')", hint="relabel everything with one substrate before mixing")
    if not fps:
        raise HermesError("the store has no labels")
    return fps[0]


def load_docs(db: str | Path) -> tuple[Docs, str]:
    con = connect(db)
    try:
        fp = store_substrate(con)
        names = stage_names(con)
        t = con.sql("SELECT c1, c2, c3, n_tokens, quality, hash(doc_id) AS h FROM labels ORDER BY rowid").to_arrow_table()
    finally:
        con.close()
    c = np.stack([t.column(n).to_numpy(zero_copy_only=False).astype(np.int64) for n in ("c1", "c2", "c3")], axis=1)
    quality = t.column("quality").cast(pa.float64()).to_numpy(zero_copy_only=False)   # NULL -> NaN
    return Docs(codes=c, n_tokens=t.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.int64),
                quality=quality, doc_hash=t.column("h").to_numpy(zero_copy_only=False).astype(np.uint64),
                names=names), fp


def read_weights_file(path: str | Path, level: int, known: set[str]) -> dict[str, float]:
    """A weights file: CSV, JSON ({cell: weight} or [{cell, weight}]) or Parquet with columns
    cell, weight. Unknown cells and negative weights are errors."""
    p = Path(path)
    if not p.is_file():
        raise HermesError(f"{p}: weights file not found", hint="pass weights:FILE with an existing file")
    rows: list[tuple[str, Any, int]] = []
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                data = data.get("weights", data)
            if isinstance(data, dict):
                rows = [(str(k), v, i + 1) for i, (k, v) in enumerate(data.items())]
            else:
                rows = [(str(r["cell"]), r["weight"], i + 1) for i, r in enumerate(data)]
        elif p.suffix == ".parquet":
            t = pq.read_table(p, columns=["cell", "weight"])
            rows = [(str(c), w, i + 1) for i, (c, w) in enumerate(zip(t.column("cell").to_pylist(),
                                                                       t.column("weight").to_pylist()))]
        else:
            import csv

            with open(p, newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"cell", "weight"} <= set(reader.fieldnames):
                    raise HermesError(f"{p}:1: the header must name the columns cell and weight "
                                      f"(found: {', '.join(reader.fieldnames or [])})")
                rows = [(r["cell"], r["weight"], reader.line_num) for r in reader]
    except (KeyError, json.JSONDecodeError, pa.ArrowException) as e:
        raise HermesError(f"{p}: not a weights file ({type(e).__name__}: {e})",
                          hint="use columns cell, weight (CSV/Parquet) or {\"cell\": weight} JSON") from None
    out: dict[str, float] = {}
    for cell, w, line in rows:
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise HermesError(f"{p}:{line}: weight of cell {cell} is not a number ({w!r}; field 'weight')") from None
        if not value >= 0 or value == float("inf"):
            raise HermesError(f"{p}:{line}: weight of cell {cell} is {value:g}; weights must be >= 0 (field 'weight')")
        if cell in out:
            raise HermesError(f"{p}:{line}: cell '{cell}' is given twice (field 'cell')",
                              hint="give each cell one weight")
        if cell not in known:
            raise HermesError(f"{p}:{line}: cell '{cell}' is not an {level_name(level)} cell of this store (field 'cell')",
                              hint=f"keys look like {', '.join(sorted(known)[:3])}; see `hermes cells --level {level}`")
        out[cell] = value
    if not out or sum(out.values()) <= 0:
        raise HermesError(f"{p}: no positive weight", hint="give at least one cell a weight > 0")
    return out


def build(db: str | Path, spec: MixSpec, loaded: tuple[Docs, str] | None = None) -> tuple[Mixture, str]:
    """Make one mixture from the store (or from arrays already loaded by `load_docs`)."""
    spec.validate()
    docs, fp = loaded if loaded is not None else load_docs(db)
    rule = parse_rule(spec.rule)
    external = None
    if rule.kind == "weights":
        known = set(key_text(np.unique(docs.keys(spec.level)), spec.level, docs.names))
        external = read_weights_file(rule.path, spec.level, known)
    return make_mixture(docs, spec, external, external_source=str(rule.path)), fp


def check_out(out: str | Path) -> Path:
    """A mixture's folder: new, or a mixture folder made before (a rerun replaces it); never
    another folder or a file, which writing the mixture would replace."""
    out = Path(out).resolve()
    if out.exists() and not (out.is_dir() and ((out / "mixture.json").is_file() or not any(out.iterdir()))):
        raise HermesError(f"{out}: exists and is not a mixture folder; writing the mixture would replace it",
                          hint="pass a new --out (or a mixture folder to make again)")
    return out


def write(mix: Mixture, db: str | Path, fingerprint: str, out: str | Path) -> Path:
    """Write the mixture folder (to a temporary name, renamed when complete)."""
    out = check_out(out)
    with replacing(out) as (tmp,):
        tmp.mkdir()
        spec = mix.spec
        rows = np.flatnonzero(mix.repeats > 0)
        con = connect(db)
        try:
            names = stage_names(con)
            sel = pa.table({"row": rows.astype(np.int64), "repeats": mix.repeats[rows].astype(np.int32)})
            con.register("selected", sel)
            key_expr, joins = key_sql(spec.draw_level, names, "l")
            manifest = con.sql(f"SELECT l.doc_id, s.repeats, l.n_tokens, {key_expr} AS cell FROM selected s "
                               f"JOIN labels l ON l.rowid = s.row {joins} ORDER BY s.row").to_arrow_table()
        finally:
            con.close()
        write_weights(mix, names, tmp / "weights.parquet")
        pq.write_table(manifest, tmp / "manifest.parquet")
        (tmp / "mixture.json").write_text(json.dumps(describe(mix, db, fingerprint), indent=2) + "\n")
    return out


def write_weights(mix: Mixture, names: dict[int, list[str]], path: Path) -> None:
    """weights.parquet: one row per level-M cell of the mixture."""
    spec, c = mix.spec, mix.cells
    cell_keys = key_text(c["key"], spec.draw_level, names)
    parent_text = key_text(parent_keys(c["key"], spec.draw_level, spec.level), spec.level, names)
    pq.write_table(pa.table({
        "cell": cell_keys, "level": pa.array([spec.draw_level] * len(cell_keys), pa.int8()), "parent": parent_text,
        "stage1_weight": c["stage1_weight"], "weight": c["weight"],
        "target_tokens": np.round(c["target_tokens"]).astype(np.int64),
        "available_tokens": c["available_tokens"].astype(np.int64), "eligible_docs": c["eligible_docs"],
        "selected_tokens": c["selected_tokens"].astype(np.int64), "quality_threshold": c["quality_threshold"],
        "epochs": c["epochs"]}), path)


def describe(mix: Mixture, db: str | Path, fingerprint: str) -> dict[str, Any]:
    s = mix.spec
    return {"spec": {"level": s.level, "rule": s.rule, "to_level": s.draw_level, "sampler": s.sampler,
                     "eligible": s.eligible, "budget_tokens": s.budget_tokens, "seed": s.seed,
                     "max_epochs": s.max_epochs},
            # the store as an absolute path: `hermes export` finds it from any folder
            "store": str(Path(db).resolve()), "substrate": fingerprint, "hermes_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "diagnostics": mix.diagnostics, "warnings": mix.warnings}


