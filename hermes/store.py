"""The DuckDB store: table `labels`, views per granularity, `substrates`, `rejects`, `stage_classes`,
`shards`.

The label files (one Parquet file per shard) are the source of truth. `build_store` builds the
store from all of them into a temporary database renamed into place at the end, so
`labels.duckdb` is complete or absent. `append_store` adds new shards' label files to a store in
one transaction, without rewriting its rows: complete, or as it was.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from hermes import aggregates
from hermes._version import __version__
from hermes.cellkeys import LEVELS, level_name, view_suffix
from hermes.errors import HermesError
from hermes.files import out_of_room, remove, replacing

READ_ONLY_TYPES = ("SELECT", "EXPLAIN")

# Columns of a label file (one per shard). `seq` is the row's position in its shard, which
# (with the shard's position in the corpus) decides which copy of a duplicate doc_id is kept.
LABEL_FILE_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("n_chars", pa.int32()), ("n_tokens", pa.int32()),
    ("quality", pa.float64()), ("c1", pa.int16()), ("c2", pa.int16()), ("c3", pa.int16()),
    ("substrate", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("seq", pa.int64()),
])
REJECT_FILE_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("doc_id", pa.string()),
                                ("reason", pa.string())])


def named_stages(con) -> list[int]:
    """0-based indices of the stages whose codes have names in this store (its fixed stages)."""
    has = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'stage_classes'").fetchall()[0][0]
    if not has:
        return []
    return [r[0] - 1 for r in con.execute("SELECT DISTINCT stage FROM stage_classes ORDER BY stage").fetchall()]


def stage_names(con) -> dict[int, list[str]]:
    """Each named stage's class names by code (0-based stage index -> names)."""
    out: dict[int, list[str]] = {}
    for i in named_stages(con):
        rows = con.execute("SELECT code, name FROM stage_classes WHERE stage = ? ORDER BY code", [i + 1]).fetchall()
        names = [""] * (rows[-1][0] + 1 if rows else 0)
        for code, name in rows:
            names[code] = name
        out[i] = names
    return out


def create_views(con) -> None:
    """The per-level aggregates (hermes.aggregates, computed once) and the views of the contract
    over them: cells_l1, cells_l12, cells_l123 and cells."""
    named = named_stages(con)
    aggregates.build(con, named)
    _refuse_same_keys(con, named)


def _refuse_same_keys(con, named: list[int]) -> None:
    if not named:
        return
    for level in LEVELS:        # names must keep cells apart: 'a.b' + 'c' and 'a' + 'b.c' would not
        dup = con.execute(f"SELECT cell FROM {aggregates.data_table(level)} GROUP BY cell HAVING count(*) > 1 "
                          "LIMIT 1").fetchall()
        if dup:
            raise HermesError(f"two {level_name(level)} cells share the key '{dup[0][0]}' (field 'stages')",
                              hint="class names of fixed stages must not make the same dotted key; "
                                   "rename the classes or make one stage learned")


# DuckDB's memory budget while building a store: past it, sorts, joins and temporary tables spill
# to disk. A per-cell quantile must hold its cell's values in memory, and the aggregates of every
# cell at once hold about QUANTILE_BYTES a label (2M labels fit in 256 MB, 4M do not): a store of
# more labels than fit computes its aggregates with DuckDB's default budget (80% of RAM) at once,
# rather than after failing under the budget (at 10M labels that failed attempt took 15-50 s, more
# than the aggregates themselves), and the words under the budget again. Where anything else does
# not fit, that step runs again with the default budget.
BUILD_MEMORY_MB = 256
QUANTILE_BYTES = 128


def build_store(db_path: str | Path, label_files: list[Path], reject_files: list[Path],
                substrate_manifest: dict[str, Any], info: dict[str, Any] | None = None,
                term_files: list[Path] | None = None) -> dict[str, Any]:
    """Build `db_path` from label and reject files (in corpus order); returns counts.

    `info` (how the labels were made: quality source, tokenizer, inputs, ...) goes to table
    `store_info` as key/value rows.
    """
    import duckdb

    fold_wal(db_path)       # a WAL an append left beside the store would not match the new file
    try:
        try:
            return _build_store(db_path, label_files, reject_files, substrate_manifest, info, term_files, BUILD_MEMORY_MB)
        except duckdb.OutOfMemoryException:
            return _build_store(db_path, label_files, reject_files, substrate_manifest, info, term_files, None)
    except Exception as e:
        if out_of_room(e):
            raise no_room(db_path, e, "the previous store is unchanged") from None
        raise


def no_room(db_path: str | Path, exc: BaseException, kept: str) -> HermesError:
    """The one-line error of a store write that ran out of disk space (or hit a file-size limit)."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return HermesError(f"{db_path}: no room to write the store ({first}); {kept}",
                       hint=f"free space in {Path(db_path).resolve().parent}, then rerun the same command "
                            f"(finished shards are kept)")


def _build_store(db_path: str | Path, label_files: list[Path], reject_files: list[Path],
                 substrate_manifest: dict[str, Any], info: dict[str, Any] | None, term_files: list[Path] | None,
                 memory_mb: int | None) -> dict[str, Any]:
    import duckdb

    db_path = Path(db_path)
    with replacing(db_path) as (tmp,):
        wal = Path(str(tmp) + ".wal")
        remove(wal)
        fingerprint = substrate_manifest["fingerprint"]
        spill = db_path.with_name(db_path.name + ".spill")
        con = duckdb.connect(str(tmp), config={"temp_directory": str(spill),
                                               **({"memory_limit": f"{memory_mb}MB"} if memory_mb else {})})
        try:
            _read_label_files(con, label_files, 0, fingerprint)
            con.execute("""
                CREATE TABLE labels AS
                SELECT doc_id, source, n_chars, n_tokens, quality,
                       CAST(c1 AS SMALLINT) AS c1, CAST(c2 AS SMALLINT) AS c2, CAST(c3 AS SMALLINT) AS c3, substrate
                FROM raw ANTI JOIN (SELECT ord, seq FROM ranked WHERE rn > 1) USING (ord, seq) ORDER BY ord, seq""")
            _add_shards(con, label_files, 0)
            _make_doc_keys(con)
            con.execute("CREATE TABLE rejects (file VARCHAR, line BIGINT, doc_id VARCHAR, reason VARCHAR)")
            if reject_files:
                con.execute("INSERT INTO rejects SELECT file, line, doc_id, reason FROM read_parquet(?)",
                            [[str(f) for f in reject_files]])
            con.execute("""
                INSERT INTO rejects
                SELECT file, line, doc_id, 'duplicate doc_id (first at ' || first_at || ')'
                FROM ranked WHERE rn > 1 ORDER BY ord, seq""")
            m = substrate_manifest
            con.execute("""
                CREATE TABLE substrates (fingerprint VARCHAR, created_at TIMESTAMP, hermes_version VARCHAR,
                    embedding_model VARCHAR, embedding JSON, transform JSON, rvq JSON, fit_sample_size BIGINT,
                    stages JSON)""")
            stack = [{k: v for k, v in st.items() if k != "classes"} for st in m.get("stages") or []]
            con.execute("INSERT INTO substrates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [m["fingerprint"], m["created_at"].replace("T", " ").rstrip("Z"), m["hermes_version"],
                         m["embedding"]["model"], json.dumps(m["embedding"]), json.dumps(m["transform"]),
                         json.dumps(m["rvq"]), m["fit_sample_size"], json.dumps(stack or None)])
            _stage_classes_table(con, m.get("stages") or [])
            con.execute("CREATE TABLE store_info (key VARCHAR, value VARCHAR)")
            info = {"hermes_version": __version__, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **(info or {})}
            con.executemany("INSERT INTO store_info VALUES (?, ?)",
                            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in info.items()])
            from hermes.terms import create_cell_terms

            for t in ("raw", "ranked", "repeated", "shard_order"):    # the label files' rows: in labels now
                con.execute(f"DROP TABLE {t}")
            fits = memory_mb is None or \
                con.execute("SELECT count(*) FROM labels").fetchall()[0][0] * QUANTILE_BYTES <= memory_mb * 10**6
            _roomy(con, lambda: create_views(con), lift=not fits)
            if memory_mb:       # the words spill to disk where they outgrow the budget: back under it
                con.execute(f"SET memory_limit = '{memory_mb}MB'")
            _roomy(con, lambda: create_cell_terms(con, [str(f) for f in (term_files or [])]))
            counts = summary(con)
            # the store must be whole in its file before it is renamed: a checkpoint that fails
            # at close() (a full disk) is silent and would leave the rows in a WAL of the old name
            con.execute("CHECKPOINT")
            con.close()
            if wal.exists():
                raise OSError(errno.ENOSPC, f"the checkpoint into {tmp} did not complete (its WAL remains)")
        except BaseException:
            con.close()
            remove(wal)
            raise
        finally:
            shutil.rmtree(spill, ignore_errors=True)
    return counts


def _roomy(con, step, lift: bool = False) -> None:
    """Run a step of the build; if it does not fit the memory budget (a per-cell quantile holds its
    cell's values), run it again with DuckDB's default budget. Its statements replace what they
    create, so a step that failed half-way runs again cleanly. `lift`: the step is known not to
    fit, and runs with the default budget at once (the budget stays lifted until the build sets
    it again)."""
    import duckdb

    if not lift:
        try:
            step()
            return
        except duckdb.OutOfMemoryException:
            pass
    con.execute("RESET memory_limit")
    step()


def _read_label_files(con, label_files: list[Path], first_ord: int, fingerprint: str) -> None:
    """Temp table `raw`: the label files' rows, each with its file's position `ord` (from
    `first_ord`, in the order given), refused if any was made by another substrate; and `ranked`:
    the copies of each doc_id that repeats among them, numbered `rn` by (ord, seq), each with where
    the first copy is (`first_at`). The first copy is the one kept."""
    con.execute("CREATE TEMP TABLE shard_order (filename VARCHAR, ord INTEGER)")
    con.executemany("INSERT INTO shard_order VALUES (?, ?)",
                    [(str(f), first_ord + i) for i, f in enumerate(label_files)])
    con.execute("CREATE TEMP TABLE raw AS SELECT r.*, o.ord FROM read_parquet(?, filename = true) r "
                "JOIN shard_order o USING (filename)", [[str(f) for f in label_files]])
    found = {r[0] for r in con.execute("SELECT DISTINCT substrate FROM raw").fetchall()}
    foreign = sorted(found - {fingerprint})
    if foreign:
        raise HermesError(f"label files were made by substrate(s) {', '.join(foreign)}, not {fingerprint} "
                          "(field 'substrate')",
                          hint="a store holds the labels of one substrate; relabel with --substrate or use another --out")
    con.execute("CREATE TEMP TABLE repeated AS SELECT doc_id FROM raw GROUP BY doc_id HAVING count(*) > 1")
    con.execute("""
        CREATE TEMP TABLE ranked AS
        SELECT *, row_number() OVER w AS rn,
               first_value(file || CASE WHEN line IS NULL THEN '' ELSE ':' || line END) OVER w AS first_at
        FROM raw SEMI JOIN repeated USING (doc_id) WINDOW w AS (PARTITION BY doc_id ORDER BY ord, seq)""")


def _add_shards(con, label_files: list[Path], first_ord: int) -> None:
    """Table shards (ord, label_file): the label files whose rows the store holds, in corpus order
    (an append adds its files after the others)."""
    con.execute("CREATE TABLE IF NOT EXISTS shards (ord INTEGER, label_file VARCHAR)")
    if label_files:
        con.executemany("INSERT INTO shards VALUES (?, ?)", [(first_ord + i, Path(f).name)
                                                             for i, f in enumerate(label_files)])


# Table doc_keys: an 8-byte key of each label's doc_id (DuckDB's hash), so that an append asks
# whether any new doc_id is in the store by scanning 8 bytes a row instead of every doc_id (2.5 s
# of an append at 100M rows). A key says "maybe": where any new key is among the store's, the
# append compares the doc_ids themselves. DuckDB's hash may differ between its versions, so the
# table's comment records the key of a fixed text, and keys of another hash are made again.
DOC_KEY = "hash(doc_id)"
_KEY_PROBE = "hermes doc_keys probe"


def _key_probe(con) -> str:
    return str(con.execute(f"SELECT {DOC_KEY} FROM (SELECT ? AS doc_id)", [_KEY_PROBE]).fetchall()[0][0])


def _make_doc_keys(con) -> None:
    """Table doc_keys: the key of every label's doc_id, under this DuckDB's hash."""
    con.execute(f"CREATE OR REPLACE TABLE doc_keys AS SELECT {DOC_KEY} AS key FROM labels")
    con.execute(f"COMMENT ON TABLE doc_keys IS '{_key_probe(con)}'")


def _doc_keys_current(con) -> bool:
    """True where table doc_keys holds the labels' keys under this DuckDB's hash: one for each
    label (an append by an earlier hermes adds labels and no keys)."""
    rows = con.execute("SELECT comment FROM duckdb_tables() WHERE table_name = 'doc_keys'").fetchall()
    if not rows or rows[0][0] != _key_probe(con):
        return False
    return con.execute("SELECT (SELECT count(*) FROM doc_keys) = (SELECT count(*) FROM labels)").fetchall()[0][0]


def store_shards(db_path: str | Path) -> list[str] | None:
    """The label files (names) a store holds, in corpus order; None for a store built before the
    store recorded them."""
    con = connect(db_path)
    try:
        if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'shards'").fetchall()[0][0]:
            return None
        return [r[0] for r in con.execute("SELECT label_file FROM shards ORDER BY ord").fetchall()]
    finally:
        con.close()


def store_counts(db_path: str | Path) -> dict[str, Any]:
    """A store's counts (labeled, rejected by reason, cells per level), as a build returns them."""
    con = connect(db_path)
    try:
        return summary(con)
    finally:
        con.close()


def store_fingerprint(db_path: str | Path) -> str | None:
    """The fingerprint of the substrate whose labels a store holds."""
    con = connect(db_path)
    try:
        rows = con.execute("SELECT fingerprint FROM substrates").fetchall()
    finally:
        con.close()
    return rows[0][0] if rows else None


def fold_wal(db_path: str | Path) -> None:
    """Fold a WAL left beside the store (an append whose checkpoint found no room) into its file."""
    import duckdb

    db_path = Path(db_path)
    if not Path(str(db_path) + ".wal").exists():
        return
    con = duckdb.connect(str(db_path))
    try:
        con.execute("CHECKPOINT")
    except duckdb.Error as e:
        if out_of_room(e):
            raise no_room(db_path, e, f"its rows stay in {db_path.name}.wal, which the next open reads") from None
        raise
    finally:
        con.close()


def append_store(db_path: str | Path, labels_dir: Path, new_label_files: list[Path], new_reject_files: list[Path],
                 substrate_manifest: dict[str, Any], info: dict[str, Any], term_files: list[Path]) -> dict[str, Any]:
    """Add label files to an existing store of the same substrate, in one transaction: their rows
    are inserted after the store's (a doc_id the store or an earlier new row already has goes to
    rejects as a duplicate, naming its first copy; the store's doc_ids are read only where a new
    row's key is in table doc_keys), the rejects added, and the per-level aggregates
    and cell_terms computed again (`term_files`: every shard's, old and new). The rows already in
    the store are not rewritten. Any failure rolls the transaction back: the store stays as it was.
    Returns the store's counts."""
    db_path = Path(db_path)
    fingerprint = substrate_manifest["fingerprint"]
    old = store_shards(db_path)
    if old is None:
        raise HermesError(f"{db_path}: this store does not record its label files, so it cannot be appended to",
                          hint="label once without --append to rebuild it; later appends then work")
    found = store_fingerprint(db_path)
    if found != fingerprint:
        raise HermesError(f"{db_path}: the store holds labels of substrate {found}, not {fingerprint} (field 'substrate')",
                          hint="append with the store's own substrate, or label into another --out")
    try:
        return _append(db_path, labels_dir, old, new_label_files, new_reject_files, fingerprint, info, term_files)
    except HermesError:
        raise
    except Exception as e:
        if out_of_room(e):
            raise no_room(db_path, e, "the append was rolled back, the store is as it was") from None
        raise


def _append(db_path: Path, labels_dir: Path, old: list[str], new_label_files: list[Path],
            new_reject_files: list[Path], fingerprint: str, info: dict[str, Any], term_files: list[Path]
            ) -> dict[str, Any]:
    import duckdb

    spill = db_path.with_name(db_path.name + ".spill")
    # an append's work is mostly aggregates (per-cell quantiles) inside one transaction, which an
    # out-of-memory error would abort: DuckDB's default budget (80% of RAM), not BUILD_MEMORY_MB
    con = duckdb.connect(str(db_path), config={"temp_directory": str(spill)})
    try:
        con.execute("BEGIN TRANSACTION")
        first = len(old)
        _read_label_files(con, new_label_files, first, fingerprint)
        keyed = _doc_keys_current(con)
        maybe = not keyed or con.execute(f"""
            SELECT count(*) FROM (SELECT key FROM doc_keys SEMI JOIN (SELECT {DOC_KEY} AS key FROM raw) USING (key)
                                  LIMIT 1)""").fetchall()[0][0] > 0
        if maybe:       # a new key among the store's (or no keys to ask): the doc_ids decide
            con.execute("CREATE TEMP TABLE in_store AS SELECT DISTINCT doc_id FROM raw SEMI JOIN labels USING (doc_id)")
        else:
            con.execute("CREATE TEMP TABLE in_store (doc_id VARCHAR)")
        # where the store's copy of such a doc_id came from: its label file, read for those ids only
        con.execute("CREATE TEMP TABLE old_order (filename VARCHAR, ord INTEGER)")
        con.executemany("INSERT INTO old_order VALUES (?, ?)", [(str(labels_dir / name), i) for i, name in enumerate(old)])
        has_dups = con.execute("SELECT count(*) FROM in_store").fetchall()[0][0] > 0
        con.execute("CREATE TEMP TABLE old_first (doc_id VARCHAR, first_at VARCHAR)")
        if has_dups and old:
            con.execute("""
                INSERT INTO old_first
                SELECT r.doc_id, first(r.file || CASE WHEN r.line IS NULL THEN '' ELSE ':' || r.line END
                                       ORDER BY o.ord, r.seq)
                FROM read_parquet(?, filename = true) r JOIN old_order o USING (filename)
                SEMI JOIN in_store s ON r.doc_id = s.doc_id GROUP BY r.doc_id""", [[str(labels_dir / n) for n in old]])
        # the new rows kept: the first copy of each doc_id, unless the store holds it
        con.execute("""
            CREATE TEMP TABLE fresh AS
            SELECT * FROM raw ANTI JOIN (SELECT ord, seq FROM ranked WHERE rn > 1) USING (ord, seq)
            ANTI JOIN in_store USING (doc_id)""")
        con.execute("""
            INSERT INTO labels
            SELECT doc_id, source, n_chars, n_tokens, quality,
                   CAST(c1 AS SMALLINT), CAST(c2 AS SMALLINT), CAST(c3 AS SMALLINT), substrate
            FROM fresh ORDER BY ord, seq""")
        if keyed:
            con.execute(f"INSERT INTO doc_keys SELECT {DOC_KEY} FROM fresh")
        else:           # a store made before the keys, or under another DuckDB's hash: every label's, once
            _make_doc_keys(con)
        if new_reject_files:
            con.execute("INSERT INTO rejects SELECT file, line, doc_id, reason FROM read_parquet(?)",
                        [[str(f) for f in new_reject_files]])
        con.execute("""
            INSERT INTO rejects
            SELECT r.file, r.line, r.doc_id, 'duplicate doc_id (first at ' || coalesce(o.first_at, k.first_at) || ')'
            FROM raw r LEFT JOIN ranked k USING (ord, seq) LEFT JOIN old_first o ON r.doc_id = o.doc_id
            WHERE k.rn > 1 OR r.doc_id IN (SELECT doc_id FROM in_store) ORDER BY r.ord, r.seq""")
        _add_shards(con, new_label_files, first)
        named = named_stages(con)
        if aggregates.has_current_layout(con):      # the cells the new rows fall in, aggregated again
            aggregates.update(con, named, "fresh")
        else:                                       # a store of an older layout: all of them, once
            aggregates.build(con, named)
        from hermes.terms import update_cell_terms

        update_cell_terms(con, [str(f) for f in term_files], new=len(new_label_files))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key, value in {**info, "hermes_version": __version__, "appended_at": stamp}.items():
            con.execute("DELETE FROM store_info WHERE key = ?", [key])
            con.execute("INSERT INTO store_info VALUES (?, ?)", [key, value if isinstance(value, str) else json.dumps(value)])
        counts = summary(con)
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        raise
    try:
        # committed: the rows are safe in the WAL, which DuckDB replays on the next open; a
        # checkpoint that fails at close() (a full disk) is silent, so it is asked for here
        con.execute("CHECKPOINT")
    except duckdb.Error as e:
        if out_of_room(e):
            first = str(e).splitlines()[0]
            raise HermesError(f"{db_path}: the append is committed but the store file could not take it ({first}); "
                              f"its rows are in {db_path.name}.wal, which the next open of the store reads",
                              hint=f"keep {db_path.name}.wal beside the store, free space in "
                                   f"{db_path.resolve().parent}, then rerun the same command: it folds the WAL "
                                   f"into the store") from None
        raise
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return counts


def _stage_classes_table(con, stack: list[dict[str, Any]]) -> None:
    """Table stage_classes (stage, code, name, kind): the class names of the fixed stages, which the
    cell keys show in place of their codes. Empty when every stage is learned."""
    con.execute("CREATE TABLE stage_classes (stage SMALLINT, code SMALLINT, name VARCHAR, kind VARCHAR)")
    rows = [(i + 1, code, name, st["kind"]) for i, st in enumerate(stack) if "classes" in st
            for code, name in enumerate(st["classes"])]
    if rows:
        con.executemany("INSERT INTO stage_classes VALUES (?, ?, ?, ?)", rows)


def summary(con) -> dict[str, Any]:
    labeled = con.execute("SELECT count(*) FROM labels").fetchall()[0][0]
    reasons = con.execute("""
        SELECT CASE WHEN reason LIKE 'duplicate doc_id%' THEN 'duplicate doc_id'
                    WHEN reason LIKE 'invalid JSON%' THEN 'invalid JSON'
                    WHEN reason LIKE 'invalid UTF-8%' THEN 'invalid UTF-8'
                    ELSE reason END AS r, count(*)
        FROM rejects GROUP BY r ORDER BY count(*) DESC, r""").fetchall()
    cells = {}
    for level in LEVELS:
        name = view_suffix(level)
        cells[name] = con.execute(f"SELECT count(*) FROM cells_{name}").fetchall()[0][0]
    return {"labeled": labeled, "rejected": sum(n for _, n in reasons),
            "reject_reasons": {r: n for r, n in reasons}, "cells": cells}


def label_count(con) -> int:
    return int(con.execute("SELECT count(*) FROM labels").fetchall()[0][0])


def labels_at(con, positions, columns: str = "doc_id, c1, c2, c3") -> pa.Table:
    """The labels at these positions in store order (sorted), read without the others: by rowid
    where the rowids are 0.. n-1 after the first (a store's labels are only ever inserted), else
    by reading every row's `columns` once."""
    import numpy as np

    positions = np.asarray(positions, dtype=np.int64)
    lo, hi, n = con.execute("SELECT min(rowid), max(rowid), count(*) FROM labels").fetchall()[0]
    if n and hi - lo + 1 == n:
        con.register("wanted_rows", pa.table({"rid": positions + lo}))
        try:
            return con.sql(f"SELECT {columns} FROM labels WHERE rowid IN (SELECT rid FROM wanted_rows) "
                           f"ORDER BY rowid").to_arrow_table()
        finally:
            con.unregister("wanted_rows")
    return con.sql(f"SELECT {columns} FROM labels ORDER BY rowid").to_arrow_table().take(pa.array(positions))


def connect(db_path: str | Path, config: dict[str, str] | None = None):
    """A read-only connection to a store (`config`: DuckDB settings, e.g. a memory limit)."""
    import duckdb

    p = Path(db_path)
    if not p.is_file():
        raise HermesError(f"{p}: no such store", hint="pass the labels.duckdb that `hermes run` wrote")
    try:
        return duckdb.connect(str(p), read_only=True, config=config or {})
    except duckdb.Error as e:
        raise HermesError(f"{p}: cannot open as a DuckDB store ({str(e).splitlines()[0]})",
                          hint="pass the labels.duckdb that `hermes run` wrote") from None


def query(db_path: str | Path, sql: str, params: list | None = None) -> pa.Table:
    """Run one read-only statement against the store and return the result as an Arrow table."""
    import duckdb

    con = connect(db_path)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as e:
            raise HermesError(f"SQL does not parse: {str(e).splitlines()[0]}") from None
        if len(statements) != 1:
            raise HermesError(f"expected one SQL statement, got {len(statements)}",
                              hint="run statements one at a time")
        kind = statements[0].type.name
        if kind not in READ_ONLY_TYPES:
            raise HermesError(f"refused: the store is read-only here and this is a {kind} statement",
                              hint="hermes sql runs SELECT (and EXPLAIN) only; the store is rebuilt by `hermes run`/`label`")
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as e:
            raise HermesError(f"query failed: {str(e).splitlines()[0]}",
                              hint="the tables are labels, rejects, substrates; the views cells, cells_l1, cells_l12, cells_l123") from None
    finally:
        con.close()


def store_info(db: str | Path) -> dict[str, Any]:
    """Table store_info as a dict (inputs and fields parsed from JSON)."""
    con = connect(db)
    try:
        rows = con.execute("SELECT key, value FROM store_info").fetchall()
    finally:
        con.close()
    return {k: json.loads(v) if k in ("inputs", "fields") else v for k, v in rows}


def info_fields(info: dict[str, Any]):
    """The reading fields a store was built with."""
    from hermes.read import Fields

    f = info.get("fields", {})
    return Fields(text=f.get("text", "text"), id=f.get("id", "id"), source=f.get("source", "source"))
