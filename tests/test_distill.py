"""The distilled fast labeler: trained from a store, accepted by `hermes label`, no embedding model."""

from __future__ import annotations

import json

import duckdb
import pytest

from tests.conftest import invoke, write_jsonl


@pytest.mark.parametrize("student", ["linear", "fasttext"])
def test_distill_then_label_without_the_encoder(e2e, tmp_path, monkeypatch, student):
    r = invoke("distill", "--db", e2e["db"], "--out", tmp_path / "fast", "--holdout", "0.2", "--student", student,
               "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    a = d["agreement"]
    assert 0 <= a["L123"] <= a["L12"] <= a["L1"] <= 1 and d["holdout_docs"] == 60
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    assert manifest["kind"] == "distilled" and manifest["teacher"] == e2e["summary"]["substrate"]
    assert manifest["student"] == student and len(json.loads((tmp_path / "fast" / "holdout.json").read_text())) == 60

    # labeling must not touch the embedding model
    import hermes.embed

    def no_encoder(*args, **kwargs):
        raise AssertionError("the distilled labeler loaded the embedding model")
    monkeypatch.setattr(hermes.embed.Embedder, "setup", no_encoder)
    corpus = write_jsonl(tmp_path / "c.jsonl", e2e["records"][:80], ["{bad json"])
    r = invoke("label", corpus, "--substrate", tmp_path / "fast", "--out", tmp_path / "out", "--format", "json",
               "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["labeled"] == 80 and s["rejected"] == 1 and s["substrate"] == d["fingerprint"]
    con = duckdb.connect(str(tmp_path / "out" / "labels.duckdb"), read_only=True)
    mine = dict((x[0], x[1:]) for x in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall())
    con.close()
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    teacher = dict((x[0], x[1:]) for x in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall())
    l12 = set(con.execute("SELECT c1, c2 FROM cells_l12").fetchall())
    con.close()
    if student == "fasttext":       # hierarchical decoding: codes are paths the teacher's store has
        assert all((c[0], c[1]) in l12 for c in mine.values())
    agree = sum(mine[k][0] == teacher[k][0] for k in mine) / len(mine)
    assert agree > 0.5                                               # most of these were in its training data
