"""`hermes fit` with the transformer embeds only its sample: the same documents that `run` (which
embeds everything, to label it) fits on, with their fixed-stage classes, at the cost of the sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import invoke, write_jsonl


def test_fit_embeds_only_its_sample_the_one_run_fits_on(sample_records, tmp_path):
    from hermes.config import load_config
    from hermes.fit import embed_texts, read_sample
    from hermes.layout import Layout, load_cached_embeddings
    from hermes.models import Models
    from hermes.read import discover

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:300])
    common = ["--encoder", "transformer", "--fit-sample", "100", "--max-length", "64", "--stages", "source,learned,learned", "--format", "json"]
    fit = invoke("fit", corpus, "--out", tmp_path / "f", *common)
    assert fit.exit_code == 0, fit.output
    assert "fit: embedding the sample only: " in fit.stderr
    assert not (tmp_path / "f" / "embeddings").exists()           # nothing else was embedded
    run = invoke("run", corpus, "--out", tmp_path / "r", "--keep-embeddings", *common, "-q")
    assert run.exit_code == 0, run.output
    manifests = [json.loads((tmp_path / d / "substrate" / "manifest.json").read_text()) for d in ("f", "r")]
    # the same sample: its size, and how many of it each source (class of stage 1) has
    assert manifests[0]["fit_sample_size"] == manifests[1]["fit_sample_size"] >= 100
    assert manifests[0]["training"]["fit_docs_per_class"] == manifests[1]["training"]["fit_docs_per_class"]
    assert manifests[0]["stages"] == manifests[1]["stages"]
    # and the same vectors, up to the last bit of float16 (the transformer batches them otherwise)
    cfg = load_config().replace(fit_sample=100, max_length=64)
    shards = discover([str(corpus)])
    sample = read_sample(shards, Models(cfg))
    assert sample.counts == [300] and len(sample.positions) == 100
    assert sample.texts.to_pylist() == [sample_records[i]["text"] for i in sample.positions]
    X = embed_texts(sample.texts, Models(cfg))
    cached = np.asarray(load_cached_embeddings(shards[0], Layout(tmp_path / "r")), dtype=np.float32)
    assert X.shape == (100, cached.shape[1]) and np.abs(X - cached[sample.positions]).max() < 4e-3


@pytest.mark.parametrize("slack", [0, 4096])
def test_the_sample_drawn_in_one_pass_is_the_smallest_keys_topped_up_per_class(monkeypatch, slack):
    """SampleDraw, fed in batches of any size, gives the documents with the `n` smallest keys of
    the seeded stream, plus each class's first `minimum` documents by key (all it has, if fewer),
    with their labels and payload rows: a plain sort of all the keys gives the same (also when it
    drops candidates as it goes: no slack)."""
    import pyarrow as pa

    from hermes import fit

    monkeypatch.setattr(fit._Candidates, "SLACK", slack)
    SampleDraw = fit.SampleDraw
    rng = np.random.default_rng(5)
    for trial in range(30):
        total, n, minimum, seed = int(rng.integers(1, 3000)), int(rng.integers(1, 400)), int(rng.integers(0, 30)), trial
        labels = {0: rng.zipf(1.5, total) % 17, 2: rng.integers(0, 3, total)} if trial % 3 else {}
        keys = np.random.default_rng(seed).random(total)
        order = np.lexsort((np.arange(total), keys))
        want = set(order[:n].tolist())
        for label in labels.values():
            for c in np.unique(label):
                want |= set(order[label[order] == c][:minimum].tolist())
        draw, start = SampleDraw(n, seed, minimum), 0
        texts = pa.table({"text": [f"d{i}" for i in range(total)]})
        while start < total:
            m = min(int(rng.integers(0, 500)), total - start)
            draw.add(m, {i: v[start:start + m] for i, v in labels.items()}, texts.slice(start, m))
            start += m
        positions, got_labels, payload = draw.result()
        assert positions.tolist() == sorted(want), trial
        assert payload.column("text").to_pylist() == [f"d{i}" for i in positions]
        assert all(np.array_equal(got_labels[i], v[positions]) for i, v in labels.items())


def test_fit_reads_the_corpus_once(sample_records, tmp_path, monkeypatch):
    import hermes.fit

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:120])
    reads = []
    real = hermes.fit.read_shard
    monkeypatch.setattr(hermes.fit, "read_shard", lambda shard, *a, **k: reads.append(shard.name) or real(shard, *a, **k))
    fit = invoke("fit", corpus, "--out", tmp_path / "f", "--encoder", "transformer", "--fit-sample", "50",
                 "--max-length", "32", "--stages", "source,learned,learned", "-q")
    assert fit.exit_code == 0, fit.output
    assert reads == ["c.jsonl"]
