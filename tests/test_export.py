"""Export: every format holds the mixture's documents with their text, repeats honoured."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from hermes import api
from tests.conftest import invoke


@pytest.fixture(scope="module")
def mixture(e2e, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "m"
    api.mix(e2e["db"], out, rule="uniform", to_level=2, eligible="top:0.5", budget_tokens=60_000, seed=4)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    return out, {m["doc_id"]: m for m in manifest}


def texts_by_id(e2e):
    return {r["id"]: r["text"] for r in e2e["records"]}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_record_formats_hold_every_copy_with_its_text(e2e, mixture, tmp_path, fmt):
    mix_dir, manifest = mixture
    out = tmp_path / fmt
    r = invoke("export", mix_dir, "--format", fmt, "--out", out, "--docs-per-shard", "40", "--json")
    assert r.exit_code == 0, r.output
    if fmt == "jsonl":
        records = [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.open()]
        assert len(list(out.glob("part-*.jsonl"))) > 1
    elif fmt == "parquet":
        records = [row for p in sorted(out.glob("part-*.parquet")) for row in pq.read_table(p).to_pylist()]
    else:
        import datasets

        records = list(datasets.load_from_disk(str(out / "dataset")))
    counts = Counter(rec["doc_id"] for rec in records)
    assert counts == {d: m["repeats"] for d, m in manifest.items()}
    truth = texts_by_id(e2e)
    assert all(rec["text"] == truth[rec["doc_id"]] and rec["cell"] == manifest[rec["doc_id"]]["cell"] for rec in records)
    # shuffled: not in manifest order
    order = [rec["doc_id"] for rec in records]
    assert order != sorted(order, key=list(manifest).index)


def test_megatron_blend_layout(e2e, mixture, tmp_path):
    mix_dir, manifest = mixture
    out = tmp_path / "meg"
    assert invoke("export", mix_dir, "--format", "megatron", "--out", out).exit_code == 0
    pairs = (out / "blend.txt").read_text().split()
    weights = {pairs[i + 1]: float(pairs[i]) for i in range(0, len(pairs), 2)}
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    cells = {m["cell"] for m in manifest.values()}
    assert set(weights) == {f"cells/{c}_text_document" for c in cells}
    for c in cells:
        lines = [json.loads(x) for x in (out / "cells" / f"{c}.jsonl").open()]
        assert {x["doc_id"] for x in lines} == {d for d, m in manifest.items() if m["cell"] == c}
        assert len(lines) == len({x["doc_id"] for x in lines})


def test_export_errors(e2e, mixture, tmp_path):
    r = invoke("export", tmp_path, "--format", "jsonl", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "is not a mixture folder" in r.stderr
    r = invoke("export", mixture[0], "--format", "csv", "--out", tmp_path / "x")
    assert r.exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.jsonl").write_text(json.dumps({"id": "zz", "text": "nothing"}) + "\n")
    r = invoke("export", mixture[0], "--format", "jsonl", "--out", tmp_path / "y", "--corpus", empty)
    assert r.exit_code == 1 and "were not found in the corpus" in r.stderr
    assert not (tmp_path / "y").exists()


def test_export_reads_a_corpus_that_moved(e2e, mixture, tmp_path):
    """--corpus points export at the corpus's new place: the texts come from there."""
    import shutil

    mix_dir, manifest = mixture
    moved = tmp_path / "moved"
    shutil.copytree(e2e["corpus"], moved)
    for p in moved.glob("*.jsonl"):                      # the moved copy's texts are marked, to tell them apart
        lines = []
        for line in p.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                lines.append(line)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                rec["text"] = "MOVED " + rec["text"]
            lines.append(json.dumps(rec))
        p.write_text("\n".join(lines) + "\n")
    r = invoke("export", mix_dir, "--format", "jsonl", "--out", tmp_path / "x", "--corpus", moved)
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for p in sorted((tmp_path / "x").glob("part-*.jsonl")) for line in p.open()]
    assert records and {x["doc_id"] for x in records} == set(manifest)
    assert all(x["text"] == "MOVED " + texts_by_id(e2e)[x["doc_id"]] for x in records)


@pytest.mark.parametrize("weak_hash", [False, True])
def test_the_manifests_ids_are_found_once_each_in_corpus_order(weak_hash, monkeypatch):
    """Export finds the manifest's documents in corpus batches by their ids' hashes: each id once,
    at its first record, also when ids repeat within and across batches and when distinct ids
    share a hash (a weak hash, the length of the id, makes them collide)."""
    import numpy as np
    import pyarrow as pa

    from hermes.export import _Wanted

    if weak_hash:
        monkeypatch.setattr(_Wanted, "_hashes", lambda self, ids: np.asarray(
            [len(i) for i in ids.to_pylist()], dtype=np.uint64))
    manifest = pa.array(["a", "bb", "cc", "dd", "e", "zzz"])
    wanted = _Wanted(manifest)
    batches = [["x", "bb", "a", "bb", "yy", "a"], ["cc", "a", "qqq", "e"], ["dd", "cc", "dd"]]
    hits = []
    for batch in batches:
        positions, rows = wanted.first_hits(pa.array(batch))
        hits.append([(int(p), manifest[int(r)].as_py()) for p, r in zip(positions, rows)])
    assert hits == [[(1, "bb"), (2, "a")], [(0, "cc"), (3, "e")], [(0, "dd")]]
    assert wanted.found.tolist() == [True, True, True, True, True, False]
