"""A store that grows: `hermes label NEW --append` adds shards to the store in OUT without
rebuilding it, and ends equal to a store built from all the shards at once."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest

from tests.conftest import invoke, write_jsonl

QUIET = ("--quiet",)

TABLES = {
    "labels": "SELECT * FROM labels",                      # in store order
    "rejects": "SELECT * FROM rejects ORDER BY ALL",
    "cells": "SELECT * FROM cells ORDER BY level, cell",
    "cell_terms": "SELECT * FROM cell_terms ORDER BY level, cell",
    "cell_words": "SELECT * FROM cell_words ORDER BY ALL",
    "shards": "SELECT * FROM shards ORDER BY ord",
    "doc_keys": "SELECT * FROM doc_keys ORDER BY ALL",
}


def _tables(db) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {k: con.execute(q).fetchall() for k, q in TABLES.items()}
    finally:
        con.close()


@pytest.fixture(scope="module")
def grown(e2e, tmp_path_factory):
    """The e2e corpus's two shards labeled into one store at once, and into another one by one
    (the second with --append), with the e2e substrate; and a third shard for more appends."""
    root = tmp_path_factory.mktemp("append")
    sub = e2e["out"] / "substrate"
    a, b = e2e["corpus"] / "a.jsonl", e2e["corpus"] / "b.jsonl"
    c = write_jsonl(root / "new" / "c.jsonl", [{"id": f"c{i}", "text": r["text"]} for i, r in
                                                enumerate(e2e["records"][:30])] + [e2e["records"][5]])
    full = invoke("label", a, b, "--substrate", sub, "--out", root / "full", *QUIET)
    assert full.exit_code == 0, full.output
    first = invoke("label", a, "--substrate", sub, "--out", root / "grown", *QUIET)
    assert first.exit_code == 0, first.output
    second = invoke("label", b, "--substrate", sub, "--out", root / "grown", "--append", "--format", "json",
                    *QUIET)
    assert second.exit_code == 0, second.output
    return {"root": root, "sub": sub, "a": a, "b": b, "c": c, "full": root / "full" / "labels.duckdb",
            "db": root / "grown" / "labels.duckdb", "summary": json.loads(second.stdout)}


def test_an_append_equals_a_full_build_over_the_same_files(grown):
    mine, full = _tables(grown["db"]), _tables(grown["full"])
    assert mine["labels"] and mine["rejects"] and mine["cell_terms"]
    for name in TABLES:
        assert mine[name] == full[name], name
    dups = [r for r in mine["rejects"] if r[3].startswith("duplicate doc_id")]
    assert dups and all("(first at a.jsonl:" in r[3] for r in dups)       # b's copy of a doc_id of a
    assert grown["summary"]["labeled"] == len(mine["labels"]) and grown["summary"]["shards"] == 1


def test_an_append_leaves_the_rows_of_the_store_and_the_earlier_label_files_alone(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["db"].parent, out)
    before = _tables(out / "labels.duckdb")
    files = sorted(p.name for p in (out / "labels").glob("*.parquet"))
    r = invoke("label", grown["c"], "--substrate", grown["sub"], "--out", out, "--append")
    assert r.exit_code == 0, r.output
    assert "added 30 of 31 documents read (1 shard)" in r.stdout and "the store now holds" in r.stdout
    after = _tables(out / "labels.duckdb")
    n = len(before["labels"])
    assert after["labels"][:n] == before["labels"] and len(after["labels"]) == n + 30
    assert after["shards"][:-1] == before["shards"] and after["shards"][-1][1].startswith("c.jsonl")
    assert sorted(p.name for p in (out / "labels").glob("*.parquet")) == sorted(files + [after["shards"][-1][1]])
    dup = [row for row in after["rejects"] if row not in before["rejects"] and row[3].startswith("duplicate")]
    assert len(dup) == 1 and dup[0][3].startswith("duplicate doc_id (first at a.jsonl:")   # held by the store
    again = invoke("label", grown["c"], grown["a"], "--substrate", grown["sub"], "--out", out, "--append")
    assert again.exit_code == 0, again.output
    assert "nothing to append" in again.stderr and _tables(out / "labels.duckdb") == after   # a rerun adds nothing


def test_a_small_append_ranks_the_words_of_the_cells_it_touches_and_equals_a_build(grown, tmp_path):
    """An append that keeps the store's word reference (30 documents after the e2e corpus) ranks
    the words of the cells it touches alone, from its own term file, and ends equal to a store
    built at once from the three shards."""
    def reference(db):
        con = duckdb.connect(str(db), read_only=True)
        try:
            return con.execute("SELECT ref_files, ref_rows, total_rows FROM word_reference").fetchall()[0]
        finally:
            con.close()

    out = tmp_path / "out"
    shutil.copytree(grown["db"].parent, out)
    before = reference(out / "labels.duckdb")
    r = invoke("label", grown["c"], "--substrate", grown["sub"], "--out", out, "--append", *QUIET)
    assert r.exit_code == 0, r.output
    after = reference(out / "labels.duckdb")
    assert after[:2] == before[:2] and after[2] > before[2]           # the reference kept, new word counts
    assert after[2].bit_length() == before[2].bit_length()            # within the power of two: ranked, not rebuilt
    full = invoke("label", grown["a"], grown["b"], grown["c"], "--substrate", grown["sub"], "--out", tmp_path / "full",
                  *QUIET)
    assert full.exit_code == 0, full.output
    assert _tables(out / "labels.duckdb") == _tables(tmp_path / "full" / "labels.duckdb")


def test_an_append_with_another_substrate_is_refused_naming_both(grown, e2e, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["db"].parent, out)
    other = tmp_path / "other"
    r = invoke("fit", e2e["corpus"], "--out", other, "--codebook-sizes", "3,3,3", "--max-length", "128", "--encoder",
               "transformer", *QUIET)
    assert r.exit_code == 0, r.output
    before = (out / "labels.duckdb").read_bytes()
    r = invoke("label", grown["c"], "--substrate", other / "substrate", "--out", out, "--append")
    assert r.exit_code == 1
    mine = json.loads((other / "substrate" / "manifest.json").read_text())["fingerprint"]
    theirs = json.loads((grown["sub"] / "manifest.json").read_text())["fingerprint"]
    assert mine in r.stderr and theirs in r.stderr and "--append" in r.stderr
    assert (out / "labels.duckdb").read_bytes() == before


def test_a_failed_append_leaves_the_store_as_it_was(grown, tmp_path):
    """A term file that cannot be read fails the append after the new rows are inserted: the
    transaction rolls back, and the store answers as before."""
    from hermes.store import append_store, store_shards
    from hermes.substrate import Substrate

    out = tmp_path / "out"
    shutil.copytree(grown["db"].parent, out)
    r = invoke("label", grown["c"], "--substrate", grown["sub"], "--out", tmp_path / "c-alone", *QUIET)
    assert r.exit_code == 0, r.output
    for folder in ("labels", "rejects"):
        for f in (tmp_path / "c-alone" / folder).glob("c*.parquet"):
            shutil.copy(f, out / folder / f.name)
    new = sorted((out / "labels").glob("c*.parquet"))
    (out / "terms").mkdir(exist_ok=True)
    broken = out / "terms" / new[0].name
    broken.write_bytes(b"not parquet")
    before = _tables(out / "labels.duckdb")
    held = store_shards(out / "labels.duckdb")
    with pytest.raises(Exception):
        append_store(out / "labels.duckdb", out / "labels", new, [], Substrate.load(grown["sub"]).manifest(),
                     {"command": "label"}, [out / "terms" / n for n in held] + [broken])
    assert _tables(out / "labels.duckdb") == before


def test_a_driver_killed_during_an_append_is_finished_by_the_rerun(grown, tmp_path):
    """SIGKILL once the new shard is labeled, so during (or just before) the store's transaction:
    the store is the old one or the appended one, never between; the rerun ends at the full build."""
    from tests.test_resume import kill_when

    out = tmp_path / "out"
    r = invoke("label", grown["a"], "--substrate", grown["sub"], "--out", out, *QUIET)
    assert r.exit_code == 0, r.output
    before = _tables(out / "labels.duckdb")
    args = ["label", str(grown["b"]), "--substrate", str(grown["sub"]), "--out", str(out), "--append", "--quiet"]
    kill_when(args, lambda: len(list((out / "labels" / "_done").glob("b.jsonl*.json"))) >= 1)
    assert _tables(out / "labels.duckdb") in (before, _tables(grown["full"]))
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert _tables(out / "labels.duckdb") == _tables(grown["full"])


def test_an_append_with_other_settings_or_without_a_store_is_refused(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["db"].parent, out)
    r = invoke("label", grown["c"], "--substrate", grown["sub"], "--out", out, "--append", "--quality", "none")
    assert r.exit_code == 1 and "field 'quality'" in r.stderr and "'heuristic'" in r.stderr
    (out / "labels.duckdb").unlink()                      # label files of earlier shards, but no store
    r = invoke("label", grown["c"], "--substrate", grown["sub"], "--out", out, "--append")
    assert r.exit_code == 1 and "no store to append to" in r.stderr
    assert len(list((out / "labels").glob("*.parquet"))) == 2        # nothing deleted
    fresh = invoke("label", grown["c"], "--substrate", grown["sub"], "--out", tmp_path / "first", "--append")
    assert fresh.exit_code == 0, fresh.output                         # the first append builds the store
    assert "labeled 31 of 31 documents read" in fresh.stdout


def test_an_append_to_a_store_of_the_earlier_layout_aggregates_it_again(grown, tmp_path):
    """A store whose aggregates lack what an append updates from (no exact sums, no percentile
    bands; cell_terms a table; no doc_id keys) is aggregated again in full by its first append,
    and ends equal to a store built at once."""
    out = tmp_path / "out"
    r = invoke("label", grown["a"], "--substrate", grown["sub"], "--out", out, *QUIET)
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(out / "labels.duckdb"))
    for level in ("l1", "l12", "l123"):
        con.execute(f"DROP TABLE IF EXISTS p70_window_{level}")
        con.execute(f"CREATE OR REPLACE TABLE cells_{level}_data AS SELECT * EXCLUDE (q_n, q_sum, q_below) "
                    f"FROM cells_{level}_data")
    con.execute("DROP TABLE doc_keys")                     # made before the keys: its append makes them
    con.execute("CREATE TABLE old_terms AS SELECT * FROM cell_terms")
    con.execute("DROP VIEW cell_terms")
    con.execute("ALTER TABLE old_terms RENAME TO cell_terms")
    con.close()
    r = invoke("label", grown["b"], "--substrate", grown["sub"], "--out", out, "--append", *QUIET)
    assert r.exit_code == 0, r.output
    assert _tables(out / "labels.duckdb") == _tables(grown["full"])


def test_an_append_to_a_store_without_band_ends_aggregates_it_again(grown, tmp_path):
    """A store of the layout before each band's ends were kept with its cell (bands, sums and keys
    there, no band_lo, band_hi, band_len) is aggregated again in full by its first append, and ends
    equal to a store built at once."""
    out = tmp_path / "out"
    r = invoke("label", grown["a"], "--substrate", grown["sub"], "--out", out, *QUIET)
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(out / "labels.duckdb"))
    for level in ("l1", "l12", "l123"):
        con.execute(f"CREATE OR REPLACE TABLE cells_{level}_data AS SELECT * EXCLUDE (band_lo, band_hi, band_len) "
                    f"FROM cells_{level}_data")
    con.close()
    r = invoke("label", grown["b"], "--substrate", grown["sub"], "--out", out, "--append", *QUIET)
    assert r.exit_code == 0, r.output
    assert _tables(out / "labels.duckdb") == _tables(grown["full"])


@pytest.mark.parametrize("key", ["hash(doc_id)", "hash(doc_id) % 2"])
def test_appends_find_duplicates_by_the_doc_id_keys_and_a_colliding_key_costs_only_time(grown, e2e, tmp_path,
                                                                                        monkeypatch, key):
    """An append with no doc_id of the store's finds that from the keys alone; the keys of its rows
    join the store's, so a later append finds a repeat of them. Keys that collide (taken modulo 2:
    every new key is among the store's) send each append to the doc_ids, with the same result."""
    from hermes import store

    monkeypatch.setattr(store, "DOC_KEY", key)
    records = [{"id": f"fresh{i}", "text": r["text"]} for i, r in enumerate(e2e["records"])]
    fresh = write_jsonl(tmp_path / "in" / "fresh.jsonl", records[:20])
    again = write_jsonl(tmp_path / "in" / "again.jsonl", records[15:25])        # 5 of fresh's ids, 5 new
    out = tmp_path / "out"
    for i, shard in enumerate((grown["a"], fresh, again)):
        r = invoke("label", shard, "--substrate", grown["sub"], "--out", out, *(("--append",) if i else ()), *QUIET)
        assert r.exit_code == 0, r.output
    full = invoke("label", grown["a"], fresh, again, "--substrate", grown["sub"], "--out", tmp_path / "full", *QUIET)
    assert full.exit_code == 0, full.output
    mine = _tables(out / "labels.duckdb")
    assert mine == _tables(tmp_path / "full" / "labels.duckdb")
    dups = [r for r in mine["rejects"] if r[3].startswith("duplicate doc_id (first at fresh.jsonl:")]
    assert sorted(r[2] for r in dups) == [f"fresh{i}" for i in range(15, 20)]
    con = duckdb.connect(str(out / "labels.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM labels").fetchall() == con.execute(
            "SELECT count(*) FROM doc_keys").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("tamper", ["DELETE FROM doc_keys", "UPDATE doc_keys SET key = key + 1; COMMENT ON TABLE doc_keys IS '1'"])
def test_keys_that_do_not_match_the_labels_are_made_again_before_they_are_trusted(grown, tmp_path, tamper):
    """Keys that no longer cover the labels (an append by an earlier hermes adds labels, no keys) or
    that another hash made (the comment's probe differs) are made again: the append still finds
    the store's copy of each repeated doc_id, and ends equal to a store built at once."""
    out = tmp_path / "out"
    r = invoke("label", grown["a"], "--substrate", grown["sub"], "--out", out, *QUIET)
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(out / "labels.duckdb"))
    for statement in tamper.split("; "):
        con.execute(statement)
    con.close()
    r = invoke("label", grown["b"], "--substrate", grown["sub"], "--out", out, "--append", *QUIET)
    assert r.exit_code == 0, r.output
    mine = _tables(out / "labels.duckdb")
    assert mine == _tables(grown["full"]) and any(row[3].startswith("duplicate doc_id") for row in mine["rejects"])
