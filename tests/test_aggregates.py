"""The per-level aggregates: an append updates them from the new rows alone (bands of values around
each L1/L12 cell's 70th percentile), and ends equal to aggregates built from all the labels at once,
with the 70th percentiles of DuckDB's quantile_cont over the labels."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from hermes import aggregates

VIEWS = ("cells_l1", "cells_l12", "cells_l123")


def _labels(rng, n: int, first: int, shift: float = 0.0, cells: int = 3, nulls: float = 0.0) -> list[tuple]:
    """n label rows: c1 of `cells`, c2 of 2, c3 of 40; quality around 0.5 + shift, a few ties, some NULL."""
    q = np.clip(rng.normal(0.5 + shift, 0.15, n), -1, 2).round(3)       # rounded: many equal values
    return [(f"d{first + i}", int(rng.integers(20, 400)), int(rng.integers(1, 90)),
             None if rng.random() < nulls else float(q[i]), int(rng.integers(cells)), int(rng.integers(2)),
             int(rng.integers(40))) for i in range(n)]


COLUMNS = ("doc_id", "n_chars", "n_tokens", "quality", "c1", "c2", "c3")


def _table(rows: list[tuple]):
    import pyarrow as pa

    return pa.table({c: pa.array([r[i] for r in rows], t) for i, (c, t) in enumerate(zip(COLUMNS, (
        pa.string(), pa.int32(), pa.int32(), pa.float64(), pa.int16(), pa.int16(), pa.int16())))})


def _store(rows: list[tuple]):
    con = duckdb.connect()
    con.register("new_rows", _table(rows))
    con.execute("CREATE TABLE labels AS SELECT * FROM new_rows")
    return con


def _append(con, rows: list[tuple]) -> dict[int, int]:
    con.register("new_rows", _table(rows))
    con.execute("CREATE OR REPLACE TEMP TABLE fresh AS SELECT * FROM new_rows")
    con.execute("INSERT INTO labels SELECT * FROM fresh")
    return aggregates.update(con, [], "fresh")


def _views(con) -> dict:
    return {v: con.execute(f"SELECT * FROM {v} ORDER BY cell").fetchall() for v in VIEWS}


def _check_p70(con) -> None:
    """The views' p70 is DuckDB's quantile_cont over the labels (to its last bit at L1 and L12, where
    DuckDB's own build fuses the interpolation's multiply-add)."""
    for level, view in zip((1, 2, 3), VIEWS):
        cs = ", ".join(f"c{i + 1}" for i in range(level))
        want = con.execute(f"SELECT {cs}, quantile_cont(quality, 0.7) FROM labels GROUP BY ALL ORDER BY ALL").fetchall()
        got = con.execute(f"SELECT {cs}, quality_p70 FROM {view} ORDER BY ALL").fetchall()
        assert [g[:-1] for g in got] == [w[:-1] for w in want], view
        assert [g[-1] for g in got] == pytest.approx([w[-1] for w in want], rel=1e-14, abs=1e-15), view


@pytest.mark.parametrize("whole_cell", [50, 800, 20])  # 800: one window for all; 20: bands too narrow to hold the p70
@pytest.mark.parametrize("case", ["alike", "all_below", "all_above", "new_cells", "nulls"])
def test_an_append_updates_the_aggregates_as_a_build_over_all_the_labels(case, whole_cell, monkeypatch):
    monkeypatch.setattr(aggregates, "WHOLE_CELL", whole_cell)
    rng = np.random.default_rng(7)
    old = _labels(rng, 6000, 0, nulls=0.05)
    new = {"alike": lambda: _labels(rng, 700, 10_000),
           # the p70 moves out of the band: the band of such a cell is made again from the labels
           "all_below": lambda: _labels(rng, 2500, 10_000, shift=-0.45),
           "all_above": lambda: _labels(rng, 2500, 10_000, shift=0.45),
           "new_cells": lambda: _labels(rng, 900, 10_000, cells=5),
           "nulls": lambda: _labels(rng, 300, 10_000, nulls=1.0)}[case]
    con = _store(old)
    aggregates.build(con, [])
    # bands hold a part of the large cells, all of the small ones
    n1 = con.execute("SELECT count(*) FROM p70_window_l1").fetchall()[0][0]
    assert 0 < n1 < 0.2 * len(old)
    first = new()
    remade = _append(con, first)
    _check_p70(con)
    # new values like the old stay inside the bands; values far to one side move the p70 out of them
    assert (remade[1] > 0) == (case in ("all_below", "all_above")), remade
    second = new()              # and once more, on the merged bands
    _append(con, second)
    _check_p70(con)
    once = _store(old + first + second)
    aggregates.build(once, [])
    assert _views(con) == _views(once)
    assert con.execute("SELECT count(*) FROM cells_l12").fetchall() == once.execute(
        "SELECT count(*) FROM cells_l12_data").fetchall()


def _check_band_ends(con) -> None:
    """Every cell's band_lo, band_hi and band_len are its band's lowest, highest value and length
    (NULL, NULL and NULL or 0 for a cell without band values)."""
    for level in (1, 2, 3):
        s = ("l1", "l12", "l123")[level - 1]
        cs = ", ".join(f"c{i + 1}" for i in range(level))
        wrong = con.execute(f"""
            SELECT count(*) FROM cells_{s}_data d
            FULL JOIN (SELECT {cs}, min(quality) AS lo, max(quality) AS hi, count(*) AS n FROM p70_window_{s}
                       GROUP BY ALL) w USING ({cs})
            WHERE d.band_lo IS DISTINCT FROM w.lo OR d.band_hi IS DISTINCT FROM w.hi
               OR coalesce(d.band_len, 0) != coalesce(w.n, 0)""").fetchall()[0][0]
        assert wrong == 0, s


def test_new_children_of_old_cells_are_counted_and_the_band_ends_kept_with_their_cells():
    """An append that makes new L123 cells under L12 cells the store has counts them in their
    parents' n_children; after a build and after each append, every cell's band ends and length
    are its band's (an append places its new values by them, without reading the bands)."""
    rng = np.random.default_rng(11)
    old = [r[:6] + (r[6] % 20,) for r in _labels(rng, 3000, 0)]      # c3 under 20: half the L123 cells
    con = _store(old)
    aggregates.build(con, [])
    _check_band_ends(con)
    before = dict(con.execute("SELECT cell, n_children FROM cells_l12").fetchall())
    rows = list(old)
    for k in range(2):
        new = _labels(rng, 400, 10_000 * (k + 1), shift=0.2 * k)       # c3 of 40: new children of old cells
        _append(con, new)
        rows += new
        _check_band_ends(con)
        _check_p70(con)
    after = dict(con.execute("SELECT cell, n_children FROM cells_l12").fetchall())
    assert set(after) == set(before) and all(after[c] > before[c] for c in before)
    once = _store(rows)
    aggregates.build(once, [])
    assert _views(con) == _views(once)


def test_the_views_carry_the_contract_columns_and_shares():
    con = _store(_labels(np.random.default_rng(1), 500, 0, nulls=0.5))
    aggregates.build(con, [])
    cols = [r[0] for r in con.execute("DESCRIBE cells_l12").fetchall()]
    assert cols == ["c1", "c2", "cell", "parent", "n_docs", "n_tokens", "share_docs", "share_tokens",
                    "quality_mean", "quality_p70", "n_children"]
    for view in VIEWS:
        docs, tokens = con.execute(f"SELECT sum(share_docs), sum(share_tokens) FROM {view}").fetchall()[0]
        assert docs == pytest.approx(1) and tokens == pytest.approx(1)
    got = con.execute("SELECT c1, quality_mean FROM cells_l1 ORDER BY c1").fetchall()
    want = con.execute("SELECT c1, avg(quality) FROM labels GROUP BY c1 ORDER BY c1").fetchall()
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-12)


def test_a_cell_of_equal_values_has_that_value_as_its_p70_at_every_level():
    """lo + (hi - lo) d is exact where the neighbours are equal: `quality >= quality_p70` keeps them."""
    rows = [(f"d{i}", 50, 10, 0.9, 0, 0, 0) for i in range(2)] + [(f"e{i}", 50, 10, 0.3, 1, 0, 0) for i in range(5)]
    con = _store(rows)
    aggregates.build(con, [])
    for view in VIEWS:
        assert con.execute(f"SELECT quality_p70 FROM {view} WHERE c1 = 0").fetchall() == [(0.9,)], view


def test_a_band_that_held_a_small_cell_narrows_once_the_cell_grows():
    """A small cell's band holds all its values and takes in every new one; past twice WHOLE_CELL
    values it is made again around the p70, so the bands stay a small part of the labels."""
    rng = np.random.default_rng(3)
    con = _store(_labels(rng, 100, 0))
    aggregates.build(con, [])
    rows = _labels(rng, 100, 0)
    for k in range(3):
        grown = _labels(rng, 20_000, 100_000 * (k + 1))
        _append(con, grown)
        rows += grown
    assert con.execute("SELECT count(*) FROM p70_window_l1").fetchall()[0][0] < 0.1 * len(rows)
    _check_p70(con)


def test_a_mid_sized_cell_keeps_a_narrow_band_not_all_its_values():
    """Cells of a few hundred values (most L12 cells of a large store) keep about ±BAND_RANKS ranks
    around the p70, not every value, and their p70 is still exact after appends."""
    rng = np.random.default_rng(5)
    rows = _labels(rng, 1500, 0)                # 6 L12 cells of about 250 values each
    con = _store(rows)
    aggregates.build(con, [])
    held = con.execute("SELECT count(*) FROM p70_window_l12").fetchall()[0][0]
    assert held < 0.3 * len(rows)
    for k in range(2):
        _append(con, _labels(rng, 40, 10_000 * (k + 1)))
    _check_p70(con)


def test_large_l123_cells_keep_bands_small_ones_none_and_a_growing_one_gets_one():
    """An L123 cell of WHOLE_CELL qualities or more keeps a band (an append reads its p70 there);
    a smaller one keeps none (an append takes quantile_cont of its values); one that grows past
    WHOLE_CELL gets a band. Either way the store equals one built at once."""
    rng = np.random.default_rng(11)
    old = _labels(rng, 24_000, 0)                                        # 240 L123 cells of about 100
    small = [(f"s{i}", 50, 10, 0.1 * (i % 7), 9, 0, i % 30) for i in range(60)]   # 30 cells of 2
    con = _store(old + small)
    aggregates.build(con, [])

    def banded() -> set:
        return set(con.execute("SELECT c1, c2, c3 FROM cells_l123_data WHERE q_below IS NOT NULL").fetchall())

    assert len(banded()) == 240 and not any(c[0] == 9 for c in banded())
    assert con.execute("SELECT count(*) FROM p70_window_l123").fetchall()[0][0] < 0.6 * len(old)
    below = _labels(rng, 24_000, 100_000, shift=-0.45)
    assert _append(con, below)[3] > 0                                    # bands the p70 left, made again
    grow = [(f"t{i}", 50, 10, 0.01 * i, 9, 0, 0) for i in range(60)]      # cell 9.0.0: 2 -> 62 values
    _append(con, _labels(rng, 500, 200_000) + grow)
    assert (9, 0, 0) in banded() and (9, 0, 1) not in banded()
    _check_p70(con)
    once = _store(con.execute("SELECT * FROM labels").fetchall())
    aggregates.build(once, [])
    assert _views(con) == _views(once)
