"""A mixture made from the store cell by cell, in memory set by the largest cell, not the corpus.

The store's labels are read from DuckDB ordered by their level-M cell (then store order), in Arrow
batches, and cut at cell boundaries into groups of whole cells (`GROUP_ROWS` documents, or one
cell if it is larger):

1. pass 1: each level-M cell's tokens, eligible tokens and documents and quality threshold, and
   each cell's tokens at every level (`mixers.CellStats`, the diagnostics' natural mass);
2. Stage 1 and Stage 2 from those (`mixers.plan`), as the in-memory mixer does;
3. pass 2: each group's draw (`mixers.draw_prefix`): its documents' repeats go to a Parquet file,
   and the one document per open cell that may still join is kept aside;
4. the joint last draw over those few (`mixers.balanced_round`, the same generator);
5. the manifest, written by DuckDB from the repeats and the labels, in store order.

The same seed gives the same manifest, weights and diagnostics as `mixers.make_mixture` over the
whole store in memory (a test checks it on real stores); the mean quality is summed in another
order, so it may differ in its last digits. DuckDB sorts within STREAM_MEMORY and spills past it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hermes.cellkeys import LEVELS, key_sql, key_text, pack
from hermes.files import replacing
from hermes.mixers import (CellStats, Mixture, MixSpec, Totals, balanced_round, cell_table, draw_prefix, draw_rng,
                           eligible_of, finish, mixture_diagnostics, no_quality, parse_eligible, parse_rule, plan,
                           priorities)

GROUP_ROWS = 1_000_000       # documents per group of whole cells (a larger cell is a group alone)
STREAM_MEMORY = "1GB"        # DuckDB's budget for sorting the labels by cell (it spills past it)
_COLUMNS = "rowid AS row, c1, c2, c3, n_tokens, quality, hash(doc_id) AS h"


class _Mass:
    """Tokens per cell at each level, summed over groups. Groups come in cell order and hold whole
    level-M cells, so each level's keys, group after group, are already sorted: a cell finer than
    M lies in one group, a coarser one in consecutive groups. The total adds up neighbours; no
    sort of the whole, and memory of about one entry per cell."""

    def __init__(self):
        self.parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {level: [] for level in LEVELS}

    def add(self, codes: np.ndarray, weights: np.ndarray) -> None:
        for level in LEVELS:
            keys, inv = np.unique(pack(codes, level), return_inverse=True)
            self.parts[level].append((keys, np.bincount(inv.reshape(-1), weights=weights, minlength=len(keys))))

    def total(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        parts = self.parts[level]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0)
        keys, sums = np.concatenate([k for k, _ in parts]), np.concatenate([w for _, w in parts])
        if not len(keys):                  # nothing of this kind in any group (no whole repeat drawn)
            return keys.astype(np.int64), sums.astype(np.float64)
        if len(keys) > 1 and not bool(np.all(keys[1:] >= keys[:-1])):
            raise AssertionError("groups out of cell order")
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        return keys[starts], np.add.reduceat(sums, starts) if len(sums) else sums


def _groups(con, level: int) -> Iterator[dict[str, np.ndarray]]:
    """The labels in groups of whole level-`level` cells (GROUP_ROWS documents, or one larger
    cell), in key order, each document's columns as arrays (row, codes (n, 3), n_tokens, quality
    with NaN for NULL, h)."""
    rows = GROUP_ROWS
    order = ", ".join(f"c{i + 1}" for i in range(level))
    reader = con.sql(f"SELECT {_COLUMNS} FROM labels ORDER BY {order}, rowid").to_arrow_reader(rows)
    pending: list[dict[str, np.ndarray]] = []      # batches as arrays, each converted once
    held, last_start, last_key = 0, 0, None        # last_start: where the last, maybe unfinished, cell starts
    for batch in reader:
        if not batch.num_rows:
            continue
        part = _arrays(pa.Table.from_batches([batch]))
        keys = pack(part["codes"], level)
        if keys[0] != last_key:
            last_start = held
        changes = np.flatnonzero(keys[1:] != keys[:-1])
        if len(changes):
            last_start = held + int(changes[-1]) + 1
        last_key = keys[-1]
        pending.append(part)
        held += len(keys)
        if held < rows or last_start == 0:         # too few rows yet, or one cell so far: read on
            continue
        group = {k: np.concatenate([p[k] for p in pending]) for k in part}
        yield {k: v[:last_start] for k, v in group.items()}
        pending = [{k: v[last_start:] for k, v in group.items()}]
        held, last_start = held - last_start, 0
    if held:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def _arrays(t: pa.Table) -> dict[str, np.ndarray]:
    col = lambda name: t.column(name).to_numpy(zero_copy_only=False)       # noqa: E731
    return {"row": col("row").astype(np.int64),
            "codes": np.stack([col(f"c{i + 1}").astype(np.int64) for i in range(3)], axis=1),
            "n_tokens": col("n_tokens").astype(np.int64),
            "quality": t.column("quality").cast(pa.float64()).to_numpy(zero_copy_only=False),
            "h": col("h").astype(np.uint64)}


def cell_stats(con, spec: MixSpec) -> tuple[CellStats, _Mass, int]:
    """Pass 1: the cells' statistics, every level's natural mass, and the number of documents."""
    L, M = spec.level, spec.draw_level
    top = parse_eligible(spec.eligible)
    natural = _Mass()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("keys", "elig_tok", "elig_docs", "thr")}
    n_docs, any_quality = 0, False
    for g in _groups(con, M):
        natural.add(g["codes"], g["n_tokens"].astype(np.float64))
        keys, cell = np.unique(pack(g["codes"], M), return_inverse=True)
        cell = cell.reshape(-1)
        any_quality = any_quality or bool((~np.isnan(g["quality"])).any())
        eligible, thr = eligible_of(cell, g["quality"], len(keys), top)
        parts["keys"].append(keys)
        parts["elig_tok"].append(np.bincount(cell, weights=g["n_tokens"] * eligible, minlength=len(keys)))
        parts["elig_docs"].append(np.bincount(cell, weights=eligible, minlength=len(keys)).astype(np.int64))
        parts["thr"].append(thr)
        n_docs += len(cell)
    if top is not None and not any_quality:
        raise no_quality(spec)
    keys_L, tokens_L = natural.total(L)
    stats = CellStats(keys_L, tokens_L, *(np.concatenate(parts[k]) for k in ("keys", "elig_tok", "elig_docs", "thr")))
    return stats, natural, n_docs


def make_mixture(con, spec: MixSpec, names: dict[int, list[str]], repeats_file: Path,
                 external: dict[str, float] | None = None, external_source: str = "weights file",
                 stats: tuple[CellStats, _Mass, int] | None = None) -> Mixture:
    """The mixture of `spec` from the store on `con`, cell by cell; the repeats of its documents go
    to `repeats_file` (row, repeats), the manifest's source. `stats`: pass 1's result, if made."""
    spec.validate()
    M = spec.draw_level
    top = parse_eligible(spec.eligible)
    stats, natural, n_docs = stats or cell_stats(con, spec)
    p = plan(stats, spec, float(stats.tokens_L.sum()), names, external, external_source)
    mixed, totals = _Mass(), Totals(docs=n_docs)
    aside: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "cell", "frac", "size", "codes", "quality", "base")}
    with pq.ParquetWriter(repeats_file, pa.schema([("row", pa.int64()), ("repeats", pa.int32())])) as out:
        for g in _groups(con, M):
            cell = np.searchsorted(stats.keys_M, pack(g["codes"], M))
            tokens, quality = g["n_tokens"], g["quality"]
            eligible = np.ones(len(cell), bool) if top is None else \
                ~np.isnan(quality) & (quality >= stats.threshold[cell] - 1e-12)
            base, last, last_cell, frac, size = draw_prefix(cell, eligible, tokens, priorities(g["h"], spec.seed),
                                                            p.targets)
            chosen = base > 0
            out.write_table(pa.table({"row": g["row"][chosen], "repeats": base[chosen].astype(np.int32)}))
            _count(mixed, totals, g["codes"][chosen], tokens[chosen], quality[chosen], base[chosen], base[chosen])
            for k, v in (("row", g["row"][last]), ("cell", last_cell), ("frac", frac), ("size", size),
                         ("codes", g["codes"][last]), ("quality", quality[last]), ("base", base[last])):
                aside[k].append(v)
        last = {k: np.concatenate(v) if v else np.zeros((0, 3) if k == "codes" else 0) for k, v in aside.items()}
        join = balanced_round(last["frac"], last["size"], draw_rng(spec.seed),
                              p.parent[last["cell"].astype(np.int64)])
        out.write_table(pa.table({"row": last["row"][join].astype(np.int64),
                                  "repeats": np.ones(int(join.sum()), np.int32)}))
        # the last draws' documents: one repeat more (from 0 or from whole passes)
        b = last["base"][join].astype(np.int64)
        extra = _Mass()
        _count(extra, totals, last["codes"][join].astype(np.int64), last["size"][join].astype(np.int64),
               last["quality"][join], np.ones(len(b), np.int64), b + 1, before=b)
    mass = {level: _aligned(natural.total(level), mixed.total(level), extra.parts[level]) for level in LEVELS}
    cells = cell_table(stats, p, mass[M][1])
    diag = mixture_diagnostics(spec, cells, p.budget, p.w_L, mass, totals)
    return finish(spec, cells, None, diag, p, mass)


def _count(mass: _Mass, t: Totals, codes: np.ndarray, tokens: np.ndarray, quality: np.ndarray, added: np.ndarray,
           repeats: np.ndarray, before: np.ndarray | None = None) -> None:
    """Add `added` repeats of these documents (now at `repeats`, from `before`) to the sums."""
    before = np.zeros(len(tokens), np.int64) if before is None else before
    tokens = tokens.astype(np.float64)
    sel = tokens * added
    mass.add(codes, sel)
    ok = ~np.isnan(quality)
    t.selected += float(sel.sum())
    t.unique_docs += int(((before == 0) & (repeats > 0)).sum())
    t.max_repeats = max(t.max_repeats, int(repeats.max()) if len(repeats) else 0)
    t.repeated += float((tokens * (np.maximum(repeats - 1, 0) - np.maximum(before - 1, 0))).sum())
    t.quality_tokens += float((quality[ok] * sel[ok]).sum())
    t.quality_weight += float(sel[ok].sum())


def _aligned(natural: tuple[np.ndarray, np.ndarray], mixed: tuple[np.ndarray, np.ndarray],
             extra: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(natural tokens, mixed tokens) over the natural cells (the mixed ones are among them);
    `extra`: the last draws' tokens, added last."""
    keys, nat = natural
    out = np.zeros(len(keys))
    out[np.searchsorted(keys, mixed[0])] = mixed[1]
    for k, w in extra:
        np.add.at(out, np.searchsorted(keys, k), w)
    return nat, out


def _quoted(path: Path) -> str:
    """A path as an SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def write_manifest(con, repeats_file: Path, draw_level: int, named: list[int], out: Path) -> None:
    """manifest.parquet from the repeats file and the labels, in store order, written by DuckDB."""
    key_expr, joins = key_sql(draw_level, named, "l")
    con.execute(f"""
        COPY (SELECT l.doc_id, CAST(s.repeats AS INTEGER) AS repeats, l.n_tokens, {key_expr} AS cell
              FROM (SELECT row, sum(repeats) AS repeats FROM read_parquet({_quoted(repeats_file)}) GROUP BY row) s
              JOIN labels l ON l.rowid = s.row {joins} ORDER BY s.row)
        TO {_quoted(out)} (FORMAT PARQUET)""")


def build_and_write(db: str | Path, spec: MixSpec, out: str | Path, keep_repeats: Path | None = None
                    ) -> tuple[Mixture, str]:
    """`hermes mix`: the mixture of `spec` from the store `db`, written to the folder `out`;
    `keep_repeats`: where to leave its (row, repeats) file (`hermes compare` reads them)."""
    from hermes.mixture import check_out, describe, read_weights_file, store_substrate, write_weights
    from hermes.store import connect, named_stages, stage_names

    out = check_out(out)           # absolute: Arrow would read a relative path with ':' as a URI
    with replacing(out) as (tmp,):
        tmp.mkdir()
        con = connect(db, config={"memory_limit": STREAM_MEMORY, "temp_directory": str(tmp / "spill")})
        try:
            fp = store_substrate(con)
            names = stage_names(con)
            stats = cell_stats(con, spec)
            external, rule = None, parse_rule(spec.rule)
            if rule.kind == "weights":
                external = read_weights_file(rule.path, spec.level, set(key_text(stats[0].keys_L, spec.level, names)))
            repeats = tmp / "repeats.parquet"
            mix = make_mixture(con, spec, names, repeats, external, str(rule.path), stats)
            write_manifest(con, repeats, spec.draw_level, named_stages(con), tmp / "manifest.parquet")
        finally:
            con.close()
        if keep_repeats is not None:
            shutil.move(repeats, keep_repeats)        # maybe onto another file system
        else:
            repeats.unlink()
        write_weights(mix, names, tmp / "weights.parquet")
        (tmp / "mixture.json").write_text(json.dumps(describe(mix, db, fp), indent=2) + "\n")
        shutil.rmtree(tmp / "spill", ignore_errors=True)
    return mix, fp


def shared_documents(a: Path, b: Path) -> tuple[int, int]:
    """(documents in both, documents in either) of two mixtures' repeats files."""
    import duckdb

    con = duckdb.connect()
    try:
        both, union = con.execute(f"""
            WITH a AS (SELECT DISTINCT row FROM read_parquet({_quoted(a)})),
                 b AS (SELECT DISTINCT row FROM read_parquet({_quoted(b)}))
            SELECT (SELECT count(*) FROM a JOIN b USING (row)),
                   (SELECT count(*) FROM a) + (SELECT count(*) FROM b) - (SELECT count(*) FROM a JOIN b USING (row))
            """).fetchall()[0]
    finally:
        con.close()
    return int(both), int(union)
