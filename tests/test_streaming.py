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
        assert streamed.diagnostics == whole.diagnostics and streamed.warnings == whole.warnings, kw
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
