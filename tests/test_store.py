"""Store invariants on a real `hermes run` (real model, real DuckDB file)."""

from __future__ import annotations

import duckdb
import pytest

from hermes import api
from hermes.errors import HermesError


@pytest.fixture(scope="module")
def con(e2e):
    c = duckdb.connect(str(e2e["db"]), read_only=True)
    yield c
    c.close()


def rows(con, sql):
    return con.execute(sql).fetchall()


def test_labels_table_has_the_contract_columns(con):
    cols = rows(con, "SELECT column_name, data_type FROM information_schema.columns "
                     "WHERE table_name = 'labels' ORDER BY ordinal_position")
    assert cols == [("doc_id", "VARCHAR"), ("source", "VARCHAR"), ("n_chars", "INTEGER"),
                    ("n_tokens", "INTEGER"), ("quality", "DOUBLE"), ("c1", "SMALLINT"),
                    ("c2", "SMALLINT"), ("c3", "SMALLINT"), ("substrate", "VARCHAR")]


def test_every_input_record_is_in_labels_or_rejects_exactly_once(e2e, con):
    labeled = [r[0] for r in rows(con, "SELECT doc_id FROM labels")]
    assert len(labeled) == len(set(labeled)) == len(e2e["records"])
    assert set(labeled) == {r["id"] for r in e2e["records"]}
    rejects = rows(con, "SELECT file, line, doc_id, reason FROM rejects ORDER BY file, line")
    # 5 bad lines + invalid UTF-8 in a.jsonl, and the duplicate at the end of b.jsonl
    assert len(rejects) == 7
    dup = [r for r in rejects if r[3].startswith("duplicate doc_id")]
    assert dup == [("corpus/b.jsonl", 101, e2e["records"][0]["id"], "duplicate doc_id (first at corpus/a.jsonl:1)")]
    rejected_ids = {r[2] for r in rejects if r[2] is not None and not r[3].startswith("duplicate")}
    assert not rejected_ids & set(labeled)
    s = e2e["summary"]
    assert s["read"] == len(labeled) + len(rejects) and s["labeled"] == len(labeled)


@pytest.mark.parametrize("view", ["cells_l1", "cells_l12", "cells_l123"])
def test_shares_sum_to_one(con, view):
    docs, tokens = rows(con, f"SELECT sum(share_docs), sum(share_tokens) FROM {view}")[0]
    assert docs == pytest.approx(1.0) and tokens == pytest.approx(1.0)


@pytest.mark.parametrize("parent, child", [("cells_l1", "cells_l12"), ("cells_l12", "cells_l123")])
def test_parents_equal_the_sum_of_their_children(con, parent, child):
    bad = rows(con, f"""
        SELECT p.cell, p.n_docs, sum(c.n_docs), p.n_tokens, sum(c.n_tokens), p.n_children, count(*)
        FROM {parent} p JOIN {child} c ON c.parent = p.cell
        GROUP BY p.cell, p.n_docs, p.n_tokens, p.n_children
        HAVING p.n_docs != sum(c.n_docs) OR p.n_tokens != sum(c.n_tokens) OR p.n_children != count(*)""")
    assert bad == []
    orphans = rows(con, f"SELECT count(*) FROM {child} WHERE parent NOT IN (SELECT cell FROM {parent})")
    assert orphans == [(0,)]


def test_views_agree_with_labels(con):
    n = rows(con, "SELECT count(*) FROM labels")[0][0]
    for level, view in ((1, "cells_l1"), (2, "cells_l12"), (3, "cells_l123")):
        assert rows(con, f"SELECT sum(n_docs) FROM {view}")[0][0] == n
        assert rows(con, f"SELECT count(*) FROM cells WHERE level = {level}") == rows(con, f"SELECT count(*) FROM {view}")
    assert rows(con, "SELECT count(*) FROM cells_l1 WHERE parent IS NOT NULL") == [(0,)]
    assert rows(con, "SELECT count(*) FROM cells_l123 WHERE n_children IS NOT NULL") == [(0,)]
    assert rows(con, "SELECT cell FROM cells_l12 LIMIT 1")[0][0].count(".") == 1


def test_tokens_count_the_whole_text_not_the_truncated_part(con):
    # the run embedded 128 tokens; long documents must still count all their tokens
    assert rows(con, "SELECT max(n_tokens) FROM labels")[0][0] > 128


def test_substrates_table_records_the_substrate(e2e, con):
    (fp, model, n_fit), = rows(con, "SELECT fingerprint, embedding_model, fit_sample_size FROM substrates")
    assert fp == e2e["summary"]["substrate"]
    assert model == "all-MiniLM-L6-v2" and n_fit >= 300
    assert rows(con, "SELECT DISTINCT substrate FROM labels") == [(fp,)]


@pytest.mark.parametrize("sql", ["DELETE FROM labels", "DROP VIEW cells", "CREATE TABLE x (a INT)",
                                 "COPY labels TO '/tmp/x.csv'", "SELECT 1; DELETE FROM labels"])
def test_query_refuses_statements_that_write(e2e, sql):
    with pytest.raises(HermesError):
        api.query(e2e["db"], sql)
    assert api.query(e2e["db"], "SELECT count(*) AS n FROM labels").to_pylist() == [{"n": 300}]


def test_a_store_whose_aggregates_need_more_than_the_build_budget_is_built(e2e, tmp_path):
    """The per-cell quantiles do not fit a 4 MB budget: the aggregates are computed with DuckDB's
    default one, and the store equals one built without a budget."""
    from hermes import store
    from hermes.substrate import Substrate

    out = e2e["out"]
    labels = sorted((out / "labels").glob("*.parquet"))
    terms = sorted((out / "terms").glob("*.parquet"))
    manifest = Substrate.load(out / "substrate").manifest()
    tiny = store._build_store(tmp_path / "tiny.duckdb", labels, [], manifest, None, terms, 4)
    assert not (tmp_path / "tiny.duckdb.spill").exists()
    roomy = store._build_store(tmp_path / "s.duckdb", labels, [], manifest, None, terms, None)
    assert tiny == roomy and tiny["labeled"] == e2e["summary"]["labeled"]
    tables = []
    for db in (tmp_path / "tiny.duckdb", tmp_path / "s.duckdb"):
        c = duckdb.connect(str(db), read_only=True)
        tables.append([rows(c, f"SELECT * FROM {t} ORDER BY ALL") for t in ("labels", "cells", "cell_terms", "rejects")])
        c.close()
    assert tables[0] == tables[1] and tables[0][0]


@pytest.mark.parametrize("bytes_per_label, first_budget", [(1, "3.8 MiB"), (10**6, None)])
def test_aggregates_that_cannot_fit_the_build_budget_take_the_default_one_at_once(e2e, tmp_path, monkeypatch,
                                                                                 bytes_per_label, first_budget):
    """The build knows from the label count whether the per-cell quantiles can fit its budget: if
    not, the aggregates are computed with DuckDB's default budget at once, not after a failed try."""
    from hermes import store
    from hermes.substrate import Substrate

    out = e2e["out"]
    budgets = []
    create_views = store.create_views

    def noting(con):
        budgets.append(con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])
        create_views(con)

    monkeypatch.setattr(store, "QUANTILE_BYTES", bytes_per_label)
    monkeypatch.setattr(store, "create_views", noting)
    store._build_store(tmp_path / "s.duckdb", sorted((out / "labels").glob("*.parquet")), [],
                       Substrate.load(out / "substrate").manifest(), None, [], 4)
    default = duckdb.connect().execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    assert budgets[0] == (first_budget or default) and budgets[-1] == default    # 4 MB: the quantiles fail under it


def test_the_store_refuses_label_files_of_another_substrate(e2e, tmp_path):
    """A label file whose rows name another substrate is refused, and the previous store stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hermes import store
    from hermes.substrate import Substrate

    out = e2e["out"]
    labels = sorted((out / "labels").glob("*.parquet"))
    manifest = Substrate.load(out / "substrate").manifest()
    t = pq.read_table(labels[0])
    other = tmp_path / "other.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("substrate"), "substrate",
                                pa.array(["0123456789abcdef"] * t.num_rows)), other)
    db = tmp_path / "s.duckdb"
    store.build_store(db, labels, [], manifest)
    before = db.read_bytes()
    with pytest.raises(HermesError, match="label files were made by substrate\\(s\\) 0123456789abcdef, not "
                                          f"{manifest['fingerprint']}"):
        store.build_store(db, [*labels, other], [], manifest)
    assert db.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def _no_room_after(limit: int):
    """A child process whose writes fail past `limit` bytes per file (RLIMIT_FSIZE): a disk that
    fills up, with EFBIG in place of ENOSPC, and without a filesystem to fill."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_disk_that_fills_up_leaves_the_previous_store(e2e, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    root = tmp_path / "copy"
    shutil.copytree(e2e["root"], root)
    out, db = root / "out", root / "out" / "labels.duckdb"
    label = [sys.executable, "-m", "hermes", "label", str(root / "corpus"), "--substrate", str(out / "substrate"),
             "--out", str(out), "-q"]
    assert subprocess.run(label, capture_output=True).returncode == 0      # the copy's shards are done
    before = db.read_bytes()

    # a rebuild: every shard is done, so the store is the only big file written
    r = subprocess.run(label, capture_output=True, text=True, preexec_fn=_no_room_after(200_000))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{db}: no room to write the store" in r.stderr and "the previous store is unchanged" in r.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("labels.duckdb")) == ["labels.duckdb"]

    # an append that commits but cannot checkpoint: its rows wait in the WAL (under 400 KB: the word
    # tables of 50 new documents take about 200 KB of it), the rerun folds it in
    new = root / "new" / "c.jsonl"
    new.parent.mkdir()
    new.write_text("".join(json.dumps({**r, "id": f"new-{i}"}) + "\n" for i, r in enumerate(e2e["records"][:50])))
    append = label[:4] + [str(new)] + label[5:] + ["--append"]
    r = subprocess.run(append, capture_output=True, text=True, preexec_fn=_no_room_after(400_000))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "the append is committed" in r.stderr and "labels.duckdb.wal" in r.stderr
    r = subprocess.run(append, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (out / "labels.duckdb.wal").exists()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM labels WHERE doc_id LIKE 'new-%'").fetchall() == [(50,)]
    con.close()

    # another append leaves its WAL; a full rebuild then folds it first (a WAL of the old file beside
    # the new one would make the store unreadable)
    newer = new.with_name("d.jsonl")
    newer.write_text("".join(json.dumps({**r, "id": f"newer-{i}"}) + "\n" for i, r in enumerate(e2e["records"][50:80])))
    r = subprocess.run(label[:4] + [str(newer)] + label[5:] + ["--append"], capture_output=True, text=True,
                       preexec_fn=_no_room_after(400_000))
    assert r.returncode == 1 and (out / "labels.duckdb.wal").exists(), r.stderr
    r = subprocess.run(label[:4] + [str(root / "corpus"), str(new.parent)] + label[5:], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (out / "labels.duckdb.wal").exists()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM labels WHERE doc_id LIKE 'new%'").fetchall() == [(80,)]
    con.close()
