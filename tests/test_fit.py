"""`hermes fit` with the transformer embeds only its sample: the same documents that `run` (which
embeds everything, to label it) fits on, with their fixed-stage classes, at the cost of the sample."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import invoke, write_jsonl


def test_fit_embeds_only_its_sample_the_one_run_fits_on(sample_records, tmp_path):
    from hermes.config import load_config
    from hermes.fit import embed_positions, sample_positions
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
    picks = sample_positions(300, cfg, {}, {})
    X = embed_positions(shards, [300], picks, Models(cfg))
    cached = np.asarray(load_cached_embeddings(shards[0], Layout(tmp_path / "r")), dtype=np.float32)
    assert X.shape == (100, cached.shape[1]) and np.abs(X - cached[picks]).max() < 4e-3
