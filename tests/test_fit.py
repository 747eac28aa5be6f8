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
    drops candidates as it goes: no slack). Documents not offered (the encoder refused them in
    `run`) take their key and no part; candidates refused after reading (`fit`'s static encoder)
    leave the sample as if never offered, whenever the margin kept enough (`exact`)."""
    import pyarrow as pa

    from hermes import fit

    monkeypatch.setattr(fit._Candidates, "SLACK", slack)
    SampleDraw = fit.SampleDraw
    rng = np.random.default_rng(5)
    outcomes = {"exact with refusals": 0, "not exact": 0}
    for trial in range(60):
        total, n, minimum, seed = int(rng.integers(1, 3000)), int(rng.integers(1, 400)), int(rng.integers(0, 30)), trial
        labels = {0: rng.zipf(1.5, total) % 17, 2: rng.integers(0, 3, total)} if trial % 3 else {}
        offered = rng.random(total) > 0.1 if trial % 4 == 1 else np.ones(total, dtype=bool)
        margin = int(rng.integers(0, 40)) if trial % 2 else 0
        draw, start = SampleDraw(n, seed, minimum, margin), 0
        texts = pa.table({"text": [f"d{i}" for i in range(total)]})
        while start < total:
            m = min(int(rng.integers(0, 500)), total - start)
            mask = offered[start:start + m]
            draw.add(m, {i: v[start:start + m][mask] for i, v in labels.items()},
                     texts.slice(start, m).filter(pa.array(mask)), offered=mask)
            start += m
        candidates, payload = draw.candidates()
        assert payload.column("text").to_pylist() == [f"d{i}" for i in candidates]
        assert offered[candidates].all()
        refused = candidates[rng.random(len(candidates)) < rng.choice([0, 0.02, 0.3])] if trial % 2 else None
        accepted = offered.copy()
        if refused is not None:
            accepted[refused] = False
        keys = np.random.default_rng(seed).random(total)
        order = [i for i in np.lexsort((np.arange(total), keys)) if accepted[i]]
        want = set(order[:n])
        for label in labels.values():
            for c in np.unique(label):
                want |= set([i for i in order if label[i] == c][:minimum])
        positions, got_labels, payload, exact = draw.result(refused)
        # exact: in every pool (the sample's n + margin smallest keys; each class's minimum + its
        # margin smallest), each label keeps enough accepted rows, or was never offered more rows
        # than the pool holds
        by_key = [i for i in np.lexsort((np.arange(total), keys)) if offered[i]]
        pools = [(np.zeros(total, dtype=np.int64), n, n + margin)] + \
            [(label, minimum, minimum + min(margin, minimum)) for label in labels.values()] * bool(minimum)
        should = all(sum(accepted[i] for i in [i for i in by_key if label[i] == c][:room]) >= k
                     or sum(1 for i in by_key if label[i] == c) <= room
                     for label, k, room in pools for c in np.unique(label[offered]))
        assert exact == should, trial
        if refused is None or not len(refused):
            assert exact, trial
        elif not exact:
            outcomes["not exact"] += 1
            continue
        else:
            outcomes["exact with refusals"] += 1
        assert positions.tolist() == sorted(want), trial
        assert payload.column("text").to_pylist() == [f"d{i}" for i in positions]
        assert all(np.array_equal(got_labels[i], v[positions]) for i, v in labels.items())
    assert min(outcomes.values()) > 0, outcomes


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


@pytest.mark.parametrize("reserve", ["kept", "too small"])
def test_a_static_fit_reads_once_and_embeds_only_its_candidates_for_the_sample_run_fits_on(
        sample_records, tmp_path, monkeypatch, reserve):
    """`fit --encoder static` reads the corpus once for the encoder's sample and the fit sample's
    candidates, embeds only those, and fits on the sample `run` fits on: the documents the encoder
    refuses (no known token) take no part, and a source whose every document it refuses is no
    class. If more candidates are refused than were kept in reserve, every document is embedded
    to draw the sample, with the same result."""
    import hermes.fit
    import hermes.pipeline
    import hermes.read

    records = [{**r, "source": f"s{i % 3}"} for i, r in enumerate(sample_records[:200])]
    for k in range(40):     # refused: a source of their own, and some of the others
        records.insert(5 * k + 3, {"id": f"bin{k}", "text": "\x00\x01\x02", "source": "bin" if k % 4 else "s1"})
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    if reserve == "too small":
        monkeypatch.setattr(hermes.fit, "refusal_margin", lambda fit_sample: 0)
    reads = []
    real = hermes.read.read_shard
    for module in (hermes.fit, hermes.pipeline, hermes.read):       # every way a shard is read
        monkeypatch.setattr(module, "read_shard", lambda shard, *a, **k: reads.append(shard.name) or real(shard, *a, **k))
    common = ["--encoder", "static", "--fit-sample", "60", "--max-length", "32", "--stages", "source,learned,learned",
              "--format", "json"]
    fit = invoke("fit", corpus, "--out", tmp_path / "f", *common)
    assert fit.exit_code == 0, fit.output
    assert (json.loads(fit.stdout)["documents"], json.loads(fit.stdout)["rejected"]) == (240, 0)   # read, either way
    if reserve == "kept":
        assert reads == ["c.jsonl"]
        assert "fit: embedding the sample's " in fit.stderr and "every document is embedded" not in fit.stderr
        assert not (tmp_path / "f" / "embeddings").exists() and not (tmp_path / "f" / "encoder").exists()
    else:
        assert reads == ["c.jsonl", "c.jsonl"] and "every document is embedded" in fit.stderr
    run = invoke("run", corpus, "--out", tmp_path / "r", *common[:-2], "-q", "--format", "json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["rejected"] == 40
    manifests = [json.loads((tmp_path / d / "substrate" / "manifest.json").read_text()) for d in ("f", "r")]
    assert manifests[0]["stages"][0]["classes"] == ["s0", "s1", "s2"] == manifests[1]["stages"][0]["classes"]
    assert manifests[0]["fit_sample_size"] == manifests[1]["fit_sample_size"] >= 60
    assert manifests[0]["training"] == manifests[1]["training"]
    assert json.loads(fit.stdout)["fingerprint"] == json.loads(run.stdout)["substrate"]
