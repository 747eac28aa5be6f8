"""The mixture made cell by cell from the store (hermes.streaming, what `hermes mix` runs) equals
the one made from the whole store in memory (hermes.mixers.make_mixture): same manifest, weights,
diagnostics and warnings for the same seed, whatever the size of its groups of cells."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hermes import mixture, streaming
from hermes.mixers import MixSpec

SPECS = [dict(),
         dict(rule="uniform", to_level=2, sampler="equal", eligible="top:0.3"),
         dict(rule="natural", level=2, to_level=3, budget_tokens=200_000, max_epochs=2.0, seed=3),
         dict(rule="unimax:2", to_level=3, eligible="top:0.5", budget_tokens=3 * 10**6, seed=7),
         dict(rule="temperature:2", level=3, budget_tokens=10**6, seed=1)]


def same_diagnostics(a: dict, b: dict) -> bool:
    """Equal, but the mean quality: summed in another order, it may differ in its last digit."""
    qa, qb = a.get("mean_quality"), b.get("mean_quality")
    close = (qa is None) == (qb is None) and (qa is None or abs(qa - qb) <= 1.5e-4)
    return close and {**a, "mean_quality": None} == {**b, "mean_quality": None}


def same_table(a: Path, b: Path) -> bool:
    ta, tb = pq.read_table(a), pq.read_table(b)
    return ta.column_names == tb.column_names and ta.to_pandas().equals(tb.cast(ta.schema).to_pandas())


@pytest.mark.parametrize("group_rows", [1_000_000, 97, 1])
def test_streamed_mixtures_equal_the_in_memory_ones(e2e, tmp_path, monkeypatch, group_rows):
    monkeypatch.setattr(streaming, "GROUP_ROWS", group_rows)      # one group; many; one row at a time
    db = e2e["db"]
    loaded = mixture.load_docs(db)
    for i, kw in enumerate(SPECS):
        spec = MixSpec(**kw)
        whole, fp = mixture.build(db, spec, loaded)
        mixture.write(whole, db, fp, tmp_path / f"memory-{i}")
        streamed, _ = streaming.build_and_write(db, spec, tmp_path / f"stream-{i}")
        for f in ("manifest.parquet", "weights.parquet"):
            assert same_table(tmp_path / f"memory-{i}" / f, tmp_path / f"stream-{i}" / f), (kw, f)
        assert same_diagnostics(streamed.diagnostics, whole.diagnostics) and streamed.warnings == whole.warnings, kw
        assert sorted(p.name for p in (tmp_path / f"stream-{i}").iterdir()) == \
            ["manifest.parquet", "mixture.json", "weights.parquet"]
    assert pq.read_table(tmp_path / "stream-1" / "manifest.parquet").num_rows > 0


def test_a_mixture_that_needs_quality_on_a_store_without_it(e2e, tmp_path):
    import duckdb

    db = tmp_path / "noq.duckdb"
    con = duckdb.connect(str(db))
    con.execute(f"ATTACH '{e2e['db']}' AS src (READ_ONLY)")
    con.execute("CREATE TABLE labels AS SELECT * REPLACE (NULL::DOUBLE AS quality) FROM src.labels")
    con.close()
    from hermes.errors import HermesError

    with pytest.raises(HermesError, match="needs quality scores"):
        streaming.build_and_write(db, MixSpec(eligible="top:0.3"), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_compare_equals_the_in_memory_grid(e2e, tmp_path):
    """`hermes compare` (each mixture cell by cell, its repeats on disk) gives the rows and pairs
    that the whole store in memory gives: the same diagnostics, TV at L1 and shared documents."""
    import numpy as np

    from hermes import api
    from hermes.mixers import factorize

    db = e2e["db"]
    got = api.compare(db, levels=(1, 3), rules=("natural", "uniform"), samplers=("equal",),
                      eligible=("all", "top:0.5"), budget_tokens=300_000, out=tmp_path / "grid")
    loaded = mixture.load_docs(db)
    docs = loaded[0]
    _, l1 = factorize(docs.keys(1))
    specs = [MixSpec(rule=r, to_level=m, sampler="equal", eligible=e, budget_tokens=300_000)
             for m in (1, 3) for r in ("natural", "uniform") for e in ("all", "top:0.5")]
    mixes = [mixture.build(db, s, loaded)[0] for s in specs]
    assert [r["mixture"] for r in got["mixtures"]] == [s.name() for s in specs]
    for row, m in zip(got["mixtures"], mixes):
        d = m.diagnostics
        assert (row["unique_docs"], row["selected_tokens"], row["tv_L123"]) == \
            (d["unique_docs"], d["selected_tokens"], d["levels"]["L123"]["tv_to_natural"])
        assert abs(row["mean_quality"] - d["mean_quality"]) <= 1.5e-4
    k = 0
    for i in range(len(mixes)):
        for j in range(i + 1, len(mixes)):
            a, b = mixes[i].repeats > 0, mixes[j].repeats > 0
            da = np.bincount(l1, weights=docs.n_tokens * mixes[i].repeats)
            db_ = np.bincount(l1, weights=docs.n_tokens * mixes[j].repeats)
            tv = round(0.5 * float(np.abs(da / da.sum() - db_ / db_.sum()).sum()), 4)
            assert got["pairs"][k] == {"a": specs[i].name(), "b": specs[j].name(), "tv_L1": tv,
                                       "jaccard_docs": round(int((a & b).sum()) / int((a | b).sum()), 4)}
            k += 1
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == sorted([s.name() for s in specs] + ["compare.json"])


def test_a_sample_of_labels_is_read_by_position(e2e, tmp_path):
    """eval and distill read their sample's rows only (by rowid), as the whole table would give."""
    import duckdb
    import numpy as np

    from hermes.store import labels_at

    con = duckdb.connect(str(e2e["db"]), read_only=True)
    whole = con.sql("SELECT doc_id, c1, c2, c3 FROM labels ORDER BY rowid").to_arrow_table()
    rows = np.sort(np.random.default_rng(0).choice(whole.num_rows, 37, replace=False))
    assert labels_at(con, rows).equals(whole.take(rows))
    con.close()
    gappy = duckdb.connect(str(tmp_path / "gappy.duckdb"))        # rowids with a gap: read whole, then taken
    gappy.execute(f"ATTACH '{e2e['db']}' AS src (READ_ONLY)")
    gappy.execute("CREATE TABLE labels AS SELECT * FROM src.labels ORDER BY rowid")
    gappy.execute("DELETE FROM labels WHERE rowid = 3")
    kept = gappy.sql("SELECT doc_id, c1, c2, c3 FROM labels ORDER BY rowid").to_arrow_table()
    rows = np.array([0, 3, 4, kept.num_rows - 1])
    assert labels_at(gappy, rows).equals(kept.take(rows))
    gappy.close()


def test_a_budget_below_every_document_and_a_path_with_a_quote(e2e, tmp_path):
    """No document gets a whole repeat (only the last draws select), and SQL sees the folder's
    quote as a character: the same mixture as in memory."""
    db = e2e["db"]
    spec = MixSpec(budget_tokens=5, seed=1)
    whole, fp = mixture.build(db, spec)
    mixture.write(whole, db, fp, tmp_path / "memory")
    streamed, _ = streaming.build_and_write(db, spec, tmp_path / "it's" / "stream")
    assert same_table(tmp_path / "memory" / "manifest.parquet", tmp_path / "it's" / "stream" / "manifest.parquet")
    assert same_diagnostics(streamed.diagnostics, whole.diagnostics)
    assert streamed.diagnostics["selected_tokens"] < 1000      # a few documents at most, from the last draws


def test_compare_writes_its_mixtures_onto_another_file_system(e2e):
    """compare keeps each mixture's repeats in a temporary folder: moved there, not renamed."""
    import shutil
    import tempfile

    from hermes import api

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    out = Path(tempfile.mkdtemp(dir="/dev/shm")) / "grid"
    try:
        got = api.compare(e2e["db"], levels=(1,), rules=("natural", "uniform"), samplers=("equal",), out=out)
        assert len(got["pairs"]) == 1 and (out / "compare.json").is_file()
    finally:
        shutil.rmtree(out.parent)


def test_mix_never_replaces_what_is_not_a_mixture(e2e, tmp_path, monkeypatch):
    """--out that is a file or another folder is refused, untouched; a mixture folder is made
    again; a relative --out with ':' works; mixture.json names the store by its absolute path."""
    import json

    from tests.conftest import invoke

    db = e2e["db"]
    kept = tmp_path / "results"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine too")
    for out in (kept, a_file):
        r = invoke("mix", "--db", db, "--out", out)
        assert r.exit_code == 1 and "exists and is not a mixture folder" in r.stderr, r.output
    assert (kept / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine too"
    monkeypatch.chdir(tmp_path)
    for _ in range(2):                      # the second time over its own mixture folder
        r = invoke("mix", "--db", db, "--rule", "temperature:2", "--out", "m-temperature:2")
        assert r.exit_code == 0, r.output
    described = json.loads((tmp_path / "m-temperature:2" / "mixture.json").read_text())
    assert described["store"] == str(Path(db).resolve())


def test_a_weights_file_that_names_a_cell_twice_is_refused(e2e, tmp_path):
    from tests.conftest import invoke

    import duckdb

    con = duckdb.connect(str(e2e["db"]), read_only=True)
    cell = con.execute("SELECT cell FROM cells_l1 LIMIT 1").fetchall()[0][0]
    con.close()
    weights = tmp_path / "w.csv"
    weights.write_text(f"cell,weight\n{cell},0.5\n{cell},0.5\n")
    r = invoke("mix", "--db", e2e["db"], "--rule", f"weights:{weights}", "--out", tmp_path / "m")
    assert r.exit_code == 1 and f"{weights}:3: cell '{cell}' is given twice" in r.stderr, r.output
