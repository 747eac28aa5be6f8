"""Quality scores: the heuristic orders texts sensibly; a quality field is read or rejected."""

from __future__ import annotations

import json

import duckdb
import pytest

from hermes.quality import heuristic_score
from hermes.read import Fields, discover, read_shard
from tests.conftest import write_jsonl

PROSE = ("The committee met on Tuesday to discuss the budget for the coming year. Most of the members "
         "agreed that the library should get more money, and that the roads could wait until spring. ") * 8


def test_heuristic_ranks_prose_above_junk():
    uuencoded = "\n".join("M)G(F&G*Z<G*R)G(:NB8:NAHFNAJZ<AHF<AJZ)AH:&K*R&B9R)G(F&KHF" for _ in range(30))
    repeated = "\n".join(["click here to subscribe now"] * 40)
    symbols = " ".join(["### ... ###"] * 50)
    p = heuristic_score(PROSE)
    for junk in (uuencoded, repeated, symbols, "ok"):
        assert 0.0 <= heuristic_score(junk) < p <= 1.0


def test_quality_field_is_read_and_bad_values_rejected(tmp_path):
    recs = [{"id": "a", "text": "hello there", "meta": {"score": 0.7}},
            {"id": "b", "text": "hello there", "meta": {"score": "high"}},
            {"id": "c", "text": "hello there", "meta": {}},
            {"id": "d", "text": "hello there", "meta": {"score": True}},
            {"id": "e", "text": "hello there", "meta": {"score": 3}},
            {"id": "f", "text": "hello there", "meta": {"score": -2e12}},     # the store sums them exactly
            {"id": "g", "text": "hello there", "meta": {"score": 1e11}}]
    p = write_jsonl(tmp_path / "q.jsonl", recs)
    docs, rejects = [], []
    for table, bad in read_shard(discover([str(p)])[0], Fields(quality="meta.score")):
        docs += table.to_pylist()
        rejects += bad
    assert [(d["doc_id"], d["quality"]) for d in docs] == [("a", 0.7), ("e", 3.0), ("g", 1e11)]
    reasons = {r.doc_id: r.reason for r in rejects}
    assert "not a number" in reasons["b"] and reasons["c"] == "missing quality field 'meta.score'"
    assert "bool, not a number" in reasons["d"] and "out of range (-2e+12" in reasons["f"]


def test_store_has_heuristic_quality_and_records_its_source(e2e):
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    nulls, lo, hi = con.execute("SELECT count(*) FILTER (quality IS NULL), min(quality), max(quality) FROM labels").fetchall()[0]
    info = dict(con.execute("SELECT key, value FROM store_info").fetchall())
    p70_ok = con.execute("SELECT bool_and(quality_p70 BETWEEN 0 AND 1) FROM cells_l12").fetchall()[0][0]
    con.close()
    assert nulls == 0 and 0 <= lo < hi <= 1 and p70_ok
    assert info["quality"] == "heuristic" and json.loads(info["inputs"])


EDGE_TEXTS = ["", "   ", "ok", "  leading space and trailing  ", "a\u2028b\u2028a", "x...\ny…\r\nx...\n\nx...",
              "\x85foo\x1cbar  baz\xa0qux\u3000end", "İstanbul THE the. (of) 'and'", "### ... • ### …",
              "line\nline\nline\nother", "ünïcödé wörds and 数字 123 456", "a\rb\ra", "dup\r\ndup\ndup\rdup\r",
              "p\x0bq\x0cp\x1dq", "same\r\nsame\r\nsame...\r\n", PROSE]


def test_batch_scores_equal_the_per_text_reference(sample_records):
    """The vectorised heuristic (Arrow kernels) gives the plain-Python score of every text."""
    import numpy as np
    import pyarrow as pa

    from hermes.quality import heuristic_scores

    texts = [r["text"] for r in sample_records] + EDGE_TEXTS
    reference = np.array([heuristic_score(t) for t in texts])
    np.testing.assert_allclose(heuristic_scores(texts), reference, rtol=0, atol=1e-12)
    np.testing.assert_allclose(heuristic_scores(pa.chunked_array([texts[:10], texts[10:]])), reference,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_rare", [0, 1, 5, 200])
def test_the_rare_texts_split_again_equal_the_slow_split_of_all(n_rare):
    """resplit_rare: a fast split with the texts that hold a rare character split again by the
    regex equals the regex split of every text, for a few rare texts (copied between runs) or many
    (one gather)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from hermes.words import resplit_rare

    rng = np.random.default_rng(n_rare)
    texts = [" ".join("abc"[: rng.integers(1, 4)] for _ in range(rng.integers(0, 6))) for _ in range(500)]
    for i in rng.choice(len(texts), n_rare, replace=False):
        texts[i] += "\fx\vy z"
    arr = pa.array(texts, pa.string())
    fast = pc.split_pattern(arr, " ")
    assert resplit_rare(arr, fast, r"[\v\f]", r"[ \f\v]").equals(pc.split_pattern_regex(arr, r"[ \f\v]"))
