"""Stages as configuration: fixed labelers (a source field, a fastText taxonomy) as stages of the
stack, with class-mean codewords, named cell keys, and learned stages below them."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import duckdb
import numpy as np
import pytest

from hermes.config import load_config, packaged_configs
from hermes.errors import HermesError
from hermes.rvq import ResidualQuantizer
from tests.conftest import FAST, invoke, write_jsonl


def _rows(db, sql, params=None):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# --------------------------------------------------------------------------- configuration

def test_the_stack_is_configuration():
    assert [s["kind"] for s in load_config().stages] == ["learned"] * 3      # the default
    named = packaged_configs()
    assert {"default", "source-first", "three-learned"} <= set(named)
    assert [s["kind"] for s in load_config("source-first").stages] == ["source", "learned", "learned"]
    assert [s["kind"] for s in load_config("three-learned").stages] == ["learned"] * 3
    cfg = load_config(overrides={"stages": "fasttext:topics.bin,learned,learned"})
    assert cfg.stages[0]["kind"] == "fasttext" and cfg.stages[0]["model"].endswith("topics.bin")


@pytest.mark.parametrize("value, message", [
    ("source,learned", "exactly 3 stages"),
    ("source,learned,kmeans", "kind 'kmeans' is not one of learned, source, fasttext"),
    ([{"kind": "fasttext"}, "learned", "learned"], "a fasttext stage needs model: FILE"),
    ([{"kind": "source", "model": "x"}, "learned", "learned"], "a source stage takes no key(s) model"),
])
def test_bad_stacks_are_named(value, message):
    with pytest.raises(HermesError) as e:
        load_config(overrides={"stages": value})
    assert message in e.value.message


def test_bad_stack_on_the_command_line(tmp_path, sample_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:5])
    r = invoke("run", corpus, "--out", tmp_path / "o", "--stages", "source,nope,learned", *FAST)
    assert r.exit_code == 1 and "stages[1]" in r.stderr and "'nope'" in r.stderr
    assert not (tmp_path / "o" / "labels.duckdb").exists()


# --------------------------------------------------------------------------- the quantizer

def test_fixed_stage_codewords_are_class_means_and_later_stages_quantize_the_rest():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    classes = rng.integers(0, 4, size=600)
    q = ResidualQuantizer(stages=3, codebook_size=8, min_points_per_code=10, fixed={0: 5}).fit(X, fixed={0: classes})
    for k in range(4):
        np.testing.assert_allclose(q.codebooks_[0][k], X[classes == k].mean(0), atol=1e-5)
    assert not q.codebooks_[0][4].any()                       # a class with no document: zero codeword
    codes = q.encode(X, fixed={0: classes})
    assert (codes[:, 0] == classes).all()
    # stage 2 is fitted on what the class mean leaves: its codewords live in residual space
    R = X - q.codebooks_[0][classes]
    assert q.sizes_ == [5, 8, 8]
    assert q.reconstruction_errors(X, codes)[1] < float(np.mean(np.sum(R ** 2, axis=1)))
    with pytest.raises(ValueError):
        q.encode(X)                                           # the fixed stage's codes are required


def test_lst_with_a_fixed_stage_ends_on_exact_class_means(real_embeddings, sample_records):
    from hermes.lst import LearnedSemanticTransform, LSTSettings

    names = sorted({r["labels"]["l1"] for r in sample_records})
    classes = np.array([names.index(r["labels"]["l1"]) for r in sample_records])
    q = ResidualQuantizer(stages=3, codebook_size=16, min_points_per_code=5, fixed={0: len(names)})
    lst = LearnedSemanticTransform(LSTSettings(epochs=3, batch_size=128), q).fit(real_embeddings, fixed={0: classes})
    q, history = lst.quantizer_, lst.history_
    H = lst.transform(real_embeddings)
    for k in range(len(names)):
        np.testing.assert_allclose(q.codebooks_[0][k], H[classes == k].mean(0), atol=1e-4)
    assert (q.encode(H, fixed={0: classes})[:, 0] == classes).all() and len(history) >= 1


# --------------------------------------------------------------------------- a source first stage, end to end

@pytest.fixture(scope="module")
def source_run(tmp_path_factory, sample_records):
    root = tmp_path_factory.mktemp("source-first")
    corpus = write_jsonl(root / "corpus.jsonl", sample_records)
    out = root / "out"
    r = invoke("run", corpus, "--out", out, "--config", "source-first", "--source-field", "labels.l1",
               "--keep-embeddings", "--format", "json", *FAST)
    assert r.exit_code == 0, r.output
    return {"root": root, "corpus": corpus, "out": out, "db": out / "labels.duckdb", "summary": json.loads(r.stdout)}


def test_a_source_first_stage_gives_one_l1_cell_per_source_named_by_it(source_run, sample_records):
    sources = Counter(r["labels"]["l1"] for r in sample_records)
    cells = dict(_rows(source_run["db"], "SELECT cell, n_docs FROM cells_l1"))
    assert cells == dict(sources)                            # one L1 cell per source, named, with its documents
    # each document's L1 cell is its own source
    by_id = {r["id"]: r["labels"]["l1"] for r in sample_records}
    rows = _rows(source_run["db"], "SELECT l.doc_id, s.name FROM labels l JOIN stage_classes s "
                                   "ON s.stage = 1 AND s.code = l.c1")
    assert len(rows) == len(sample_records) and all(by_id[d] == name for d, name in rows)
    # keys below the source carry its name; the learned stages split every source
    l12 = _rows(source_run["db"], "SELECT cell, parent FROM cells_l12")
    assert all(cell.startswith(parent + ".") and cell[len(parent) + 1:].isdigit() for cell, parent in l12)
    assert len(l12) > len(sources)
    assert "source (7 classes)" in source_run["summary"]["stages"]


def test_source_stage_store_keeps_its_invariants(source_run):
    db = source_run["db"]
    for view in ("cells_l1", "cells_l12", "cells_l123"):
        assert abs(_rows(db, f"SELECT sum(share_docs) FROM {view}")[0][0] - 1) < 1e-9
    bad = _rows(db, """SELECT p.cell FROM cells_l1 p JOIN cells_l12 c ON c.parent = p.cell
                       GROUP BY p.cell, p.n_docs HAVING sum(c.n_docs) <> p.n_docs""")
    assert bad == []
    terms = _rows(db, "SELECT cell FROM cell_terms WHERE level = 1")
    assert {t[0] for t in terms} == {c[0] for c in _rows(db, "SELECT cell FROM cells_l1")}


def test_source_codeword_is_the_class_mean_in_transformed_space(source_run):
    from hermes.layout import open_embeddings
    from hermes.substrate import Substrate

    sub = Substrate.load(source_run["out"] / "substrate")
    assert [s["kind"] for s in sub.stages] == ["source", "learned", "learned"]
    assert sub.stages[0]["classes"] == sorted(sub.stages[0]["classes"])
    emb_file = next((source_run["out"] / "embeddings").glob("*.emb.f16"))
    H = sub.transform.transform(np.asarray(open_embeddings(emb_file), dtype=np.float32))
    c1 = np.array([r[0] for r in _rows(source_run["db"], "SELECT c1 FROM labels ORDER BY rowid")])
    assert len(c1) == len(H)                                 # 300 docs, all in the fit sample
    for k in range(len(sub.stages[0]["classes"])):
        np.testing.assert_allclose(sub.quantizer.codebooks_[0][k], H[c1 == k].mean(0), atol=1e-4)


def test_mixing_and_export_use_the_named_cells(source_run, tmp_path):
    db = source_run["db"]
    weights = tmp_path / "w.csv"
    weights.write_text("cell,weight\ncomp,3\nsci,1\n")
    r = invoke("mix", "--db", db, "--rule", f"weights:{weights}", "--to-level", "2", "--eligible", "top:0.3",
               "--out", tmp_path / "m", "--format", "json")
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    w = pq.read_table(tmp_path / "m" / "weights.parquet").to_pylist()
    assert {row["parent"] for row in w if row["selected_tokens"] > 0} == {"comp", "sci"}
    assert all(row["cell"].startswith(row["parent"] + ".") for row in w)
    manifest = pq.read_table(tmp_path / "m" / "manifest.parquet").to_pylist()
    assert manifest and all(m["cell"].split(".")[0] in ("comp", "sci") for m in manifest)
    weights.write_text("cell,weight\nnot-a-source,1\n")
    r = invoke("mix", "--db", db, "--rule", f"weights:{weights}", "--out", tmp_path / "m2")
    assert r.exit_code == 1 and "cell 'not-a-source' is not an L1 cell" in r.stderr
    r = invoke("export", tmp_path / "m", "--format", "megatron", "--out", tmp_path / "meg")
    assert r.exit_code == 0, r.output
    blend = (tmp_path / "meg" / "blend.txt").read_text().split()
    assert blend and all(p.startswith(("cells/comp.", "cells/sci.")) for p in blend[1::2])


def test_labeling_with_a_source_stage_rejects_unknown_sources(source_run, sample_records, tmp_path):
    new = [dict(r, id=f"new-{i}") for i, r in enumerate(sample_records[:12])]
    for r in new[:3]:
        r["labels"] = dict(r["labels"], l1="newsource")
    corpus = write_jsonl(tmp_path / "new.jsonl", new)
    sub = source_run["out"] / "substrate"
    r = invoke("label", corpus, "--substrate", sub, "--out", tmp_path / "wrong-field", "--quiet")
    assert r.exit_code == 1 and "labels by source field 'labels.l1'" in r.stderr and "--source-field" in r.stderr
    r = invoke("label", corpus, "--substrate", sub, "--out", tmp_path / "o", "--source-field", "labels.l1",
               "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["labeled"] == 9 and s["rejected"] == 3
    rejects = _rows(tmp_path / "o" / "labels.duckdb", "SELECT doc_id, reason FROM rejects ORDER BY doc_id")
    assert [d for d, _ in rejects] == ["new-0", "new-1", "new-2"]
    assert all("is not a class of stage 1" in reason and "labels.l1" in reason for _, reason in rejects)
    # the labeled ones got their own source as L1 cell
    got = dict(_rows(tmp_path / "o" / "labels.duckdb", "SELECT l.doc_id, s.name FROM labels l "
                                                       "JOIN stage_classes s ON s.stage = 1 AND s.code = l.c1"))
    assert got == {r["id"]: r["labels"]["l1"] for r in new[3:]}


# --------------------------------------------------------------------------- a fastText taxonomy stage

@pytest.fixture(scope="module")
def taxonomy_model(tmp_path_factory, sample_records):
    """A fastText topic classifier (top-level newsgroup hierarchy) trained here on real posts."""
    from hermes.fasttext_quality import normalise, train_supervised

    root = tmp_path_factory.mktemp("taxonomy")
    train = root / "train.txt"
    with open(train, "w", encoding="utf-8") as f:
        for r in sample_records:
            f.write(f"__label__{r['labels']['l1']} {normalise(r['text'])}\n")
    model, _ = train_supervised(str(train), root / "topics.bin", epoch=20, lr=0.5, bucket=200_000, dim=32)
    return root / "topics.bin", model


def test_a_fasttext_taxonomy_first_stage(source_run, taxonomy_model, sample_records, tmp_path):
    from hermes.fasttext_quality import normalise

    path, model = taxonomy_model
    out = tmp_path / "out"
    shutil.copytree(source_run["out"], out)        # the kept embeddings are reused: no re-embedding
    r = invoke("run", source_run["corpus"], "--out", out, "--stages", f"fasttext:{path},learned,learned",
               "--format", "json", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["timings"]["embed"] < 10 * 60 and "fasttext(topics.bin)" in summary["stages"]
    labels = sorted(lab[len("__label__"):] for lab in model.get_labels())
    classes = _rows(out / "labels.duckdb", "SELECT name FROM stage_classes WHERE stage = 1 ORDER BY code")
    assert [c[0] for c in classes] == labels                 # every label of the model is a class
    got = dict(_rows(out / "labels.duckdb", "SELECT l.doc_id, s.name FROM labels l JOIN stage_classes s "
                                            "ON s.stage = 1 AND s.code = l.c1"))
    predicted, _ = model.predict([normalise(r["text"]) for r in sample_records], k=1)
    assert got == {r["id"]: p[0][len("__label__"):] for r, p in zip(sample_records, predicted)}
    l1 = {c for (c,) in _rows(out / "labels.duckdb", "SELECT cell FROM cells_l1")}
    assert l1 <= set(labels) and len(l1) >= 5


def test_a_taxonomy_model_that_changed_is_refused(source_run, taxonomy_model, tmp_path):
    path, _ = taxonomy_model
    copy = tmp_path / "topics.bin"
    shutil.copy(path, copy)
    out = tmp_path / "out"
    shutil.copytree(source_run["out"], out)
    corpus = write_jsonl(tmp_path / "c.jsonl", [json.loads(line) for line in
                                                 source_run["corpus"].read_text().splitlines()[:40]])
    r = invoke("fit", corpus, "--out", out, "--stages", f"fasttext:{copy},learned,learned", "--quiet",
               "--encoder", "transformer")
    assert r.exit_code == 0, r.output
    with open(copy, "ab") as f:
        f.write(b"\0")
    r = invoke("label", corpus, "--substrate", out / "substrate", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 1 and "changed since the substrate was fitted" in r.stderr
    r = invoke("run", corpus, "--out", tmp_path / "o2", "--stages", f"fasttext:{tmp_path / 'none.bin'},learned,learned",
               *FAST)
    assert r.exit_code == 1 and "none.bin: fastText taxonomy model not found" in r.stderr


def test_changing_the_source_field_or_quality_keeps_the_embeddings(source_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(source_run["out"], out)
    emb = next((out / "embeddings").glob("*.emb.f16"))
    before = emb.read_bytes()
    (out / "run.log").unlink()
    r = invoke("run", source_run["corpus"], "--out", out, "--source-field", "source", "--quality", "none",
               "--keep-embeddings", "--format", "json", *FAST)
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (out / "run.log").read_text().splitlines()]
    assert [e["skipped"] for e in log if e["step"] == "embed"] == [True]       # not embedded again
    assert emb.read_bytes() == before
    rows = _rows(out / "labels.duckdb", "SELECT DISTINCT source, quality FROM labels")
    assert rows == [("20news-bydate", None)]
    assert [c for (c,) in _rows(out / "labels.duckdb", "SELECT count(*) FROM stage_classes")] == [0]


@pytest.mark.parametrize("student", ["linear", "fasttext"])
def test_a_distilled_labeler_of_a_source_first_store(source_run, sample_records, tmp_path, student):
    r = invoke("distill", "--db", source_run["db"], "--out", tmp_path / "fast", "--holdout", "0.2",
               "--student", student, "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    if student == "linear":      # the source is read from each document, so L1 agrees exactly
        assert json.loads(r.stdout)["agreement"]["L1"] == 1.0
        manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
        assert manifest["settings"]["decision"]["stage"] == 1       # the first learned stage
        assert manifest["settings"]["fine"]["after_stage"] == 1     # the finer prediction: stage 3
    new = [dict(r, id=f"new-{i}") for i, r in enumerate(sample_records[:50])]
    new[0]["labels"] = dict(new[0]["labels"], l1="newsource")
    corpus = write_jsonl(tmp_path / "c.jsonl", new)
    r = invoke("label", corpus, "--substrate", tmp_path / "fast", "--out", tmp_path / "out",
               "--source-field", "labels.l1", "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    teacher = {n for (n,) in _rows(source_run["db"], "SELECT name FROM stage_classes WHERE stage = 1")}
    db = tmp_path / "out" / "labels.duckdb"
    cells = {c for (c,) in _rows(db, "SELECT cell FROM cells_l1")}
    assert cells and cells <= teacher                        # named as the teacher's store names them
    if student == "linear":
        got = dict(_rows(db, "SELECT l.doc_id, s.name FROM labels l JOIN stage_classes s ON s.stage = 1 AND s.code = l.c1"))
        assert got == {r["id"]: r["labels"]["l1"] for r in new[1:]}
        assert [d for (d,) in _rows(db, "SELECT doc_id FROM rejects")] == ["new-0"]
        r = invoke("label", corpus, "--substrate", tmp_path / "fast", "--out", tmp_path / "o2", "--quiet")
        assert r.exit_code == 1 and "--source-field labels.l1" in r.stderr


def test_kept_embeddings_alone_are_enough_to_rerun(source_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(source_run["out"] / "embeddings", out / "embeddings")      # no rejects/ beside them
    r = invoke("run", source_run["corpus"], "--out", out, "--config", "source-first", "--source-field", "labels.l1",
               "--keep-embeddings", "--format", "json", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["labeled"] == 300
    log = [json.loads(line) for line in (out / "run.log").read_text().splitlines()]
    assert [e["skipped"] for e in log if e["step"] == "embed"] == [True]


def test_report_of_a_source_first_store(source_run, tmp_path):
    import re
    import subprocess

    from hermes import api
    from hermes.report import gather
    from tests.test_report import CHROMIUM, FLAGS

    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"comp": 1, "talk": 1}))
    api.mix(source_run["db"], tmp_path / "m", rule=f"weights:{weights}", to_level=2, eligible="top:0.3")
    data = gather(source_run["db"], [tmp_path / "m"])
    assert sorted(n["k"] for n in data["hierarchy"]) == ["alt", "comp", "misc", "rec", "sci", "soc", "talk"]
    assert all(c["k"].startswith(n["k"] + ".") for n in data["hierarchy"] for c in n["c"])
    assert set(data["snippets"]) <= {n["k"] for n in data["hierarchy"]} and data["snippets"]
    bars = {k: mixed for k, _, mixed in data["mixtures"][0]["l1"]}
    assert bars["comp"] > 0 and bars["talk"] > 0 and abs(bars["comp"] + bars["talk"] - 1) < 1e-3
    api.report(source_run["db"], tmp_path / "r.html", [tmp_path / "m"])
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian package chromium; .ci/run installs it)")
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          (tmp_path / "r.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="render-ok"' in dom
    errors = re.search(r'<div id="errors">(.*?)</div>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == ""
    assert dom.count('class="tile') >= 7


def test_a_source_field_with_too_many_values_is_refused(sample_records, tmp_path, monkeypatch):
    import hermes.stack

    monkeypatch.setattr(hermes.stack, "MAX_CLASSES", 5)     # the real limit is 32,767 (SMALLINT codes)
    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:40])
    r = invoke("run", corpus, "--out", tmp_path / "o", "--stages", "source,learned,learned",
               "--source-field", "leaf", *FAST)
    assert r.exit_code == 1 and "stage 1 (source) has" in r.stderr and "at most 5" in r.stderr
    assert not (tmp_path / "o" / "labels.duckdb").exists()
