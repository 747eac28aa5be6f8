"""fastText quality: a classifier trained in the session scores documents; bad models are refused."""

from __future__ import annotations

import json

import duckdb
import pytest

from tests.conftest import FAST, invoke, write_jsonl


@pytest.fixture(scope="module")
def model(e2e, tmp_path_factory):
    root = tmp_path_factory.mktemp("ftq")
    pos = [r for r in e2e["records"] if r["leaf"].startswith(("sci.", "comp."))]
    neg = [r for r in e2e["records"] if r["leaf"].startswith(("rec.", "talk."))]
    write_jsonl(root / "pos.jsonl", pos)
    write_jsonl(root / "neg.jsonl", neg)
    r = invoke("train-quality", "--positive", root / "pos.jsonl", "--negative", root / "neg.jsonl",
               "--out", root / "model", "--holdout", "0.25", "--epochs", "25", "--format", "json")
    assert r.exit_code == 0, r.output
    return root, json.loads(r.stdout)


def test_train_quality_reports_held_out_metrics_and_a_card(model):
    root, card = model
    m = card["metrics"]
    assert m["holdout_docs"] > 20 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["auc"] > 0.7                                    # topics this different separate well
    saved = json.loads((root / "model" / "card.json").read_text())
    assert saved["settings"]["bucket"] == 200_000 and saved["normaliser"].startswith("whitespace")
    assert (root / "model" / "model.bin").stat().st_size < 100_000_000


def test_run_with_a_fasttext_quality_model(e2e, model, tmp_path):
    root, _ = model
    write_jsonl(tmp_path / "c.jsonl", e2e["records"][:60])
    out = tmp_path / "out"
    r = invoke("run", tmp_path / "c.jsonl", "--out", out, "--quality-model", root / "model" / "model.bin", *FAST)
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(out / "labels.duckdb"), read_only=True)
    q = con.execute("SELECT min(quality), max(quality), count(quality) FROM labels").fetchall()[0]
    info = dict(con.execute("SELECT key, value FROM store_info").fetchall())
    con.close()
    assert 0 <= q[0] < q[1] <= 1 and q[2] == 60 and info["quality"] == "fasttext"
    r = invoke("mix", "--db", out / "labels.duckdb", "--eligible", "top:0.3", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output


def test_bad_quality_models(e2e, model, tmp_path):
    root, _ = model
    corpus = write_jsonl(tmp_path / "c.jsonl", e2e["records"][:5])
    notft = tmp_path / "x.bin"
    notft.write_bytes(b"definitely not fasttext")
    r = invoke("run", corpus, "--out", tmp_path / "o1", "--quality-model", notft, *FAST)
    assert r.exit_code == 1 and "x.bin: not a fastText model" in r.stderr
    r = invoke("run", corpus, "--out", tmp_path / "o2", "--quality-model", root / "model" / "model.bin",
               "--quality-label", "__label__good", *FAST)
    assert r.exit_code == 1 and "no label '__label__good'" in r.stderr and "__label__hq" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
