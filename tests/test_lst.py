"""The Learned Semantic Transform trained with the codebooks, on real embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from hermes.lst import LearnedSemanticTransform, LSTSettings
from hermes.rvq import ResidualQuantizer
from hermes.substrate import Substrate


@pytest.fixture(scope="module")
def trained(real_embeddings):
    q = ResidualQuantizer(codebook_size=16, min_points_per_code=5, seed=0)
    lst = LearnedSemanticTransform(LSTSettings(epochs=8, batch_size=128), q, seed=0).fit(real_embeddings)
    return lst, lst.quantizer_, lst.history_


def test_transform_stays_orthogonal_and_unit_norm(trained, real_embeddings):
    lst, _, history = trained
    assert lst.orthogonality_error() < 1e-3
    h = lst.transform(real_embeddings)
    assert np.allclose(np.linalg.norm(h, axis=1), 1, atol=1e-5)
    assert {"structure", "reconstruction", "orthogonality", "commitment", "loss"} <= set(history[0])


def test_training_lowers_the_loss_and_keeps_structure(trained, real_embeddings):
    lst, _, history = trained
    assert history[-1]["loss"] < history[0]["loss"]
    e, h = real_embeddings, lst.transform(real_embeddings)
    i, j = np.arange(len(e)), np.roll(np.arange(len(e)), 7)
    gap = np.abs((e[i] * e[j]).sum(1) - (h[i] * h[j]).sum(1)).mean()
    assert gap < 0.1


def test_reconstruction_error_falls_with_each_stage(trained, real_embeddings):
    lst, q, _ = trained
    errors = q.reconstruction_errors(lst.transform(real_embeddings))
    assert 1.0 > errors[0] > errors[1] > errors[2]


def test_deterministic_for_a_seed(real_embeddings):
    q = ResidualQuantizer(codebook_size=8, min_points_per_code=5, seed=1)
    runs = [LearnedSemanticTransform(LSTSettings(epochs=3, batch_size=128), q, seed=1).fit(real_embeddings)
            for _ in range(2)]
    assert np.array_equal(runs[0].W_, runs[1].W_)
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].quantizer_.codebooks_, runs[1].quantizer_.codebooks_))
    assert not hasattr(q, "codebooks_")        # fit trains a copy of the quantizer it was given


def test_save_load_encode_identity(trained, real_embeddings, tmp_path):
    lst, q, history = trained
    sub = Substrate(embedding={"model": "m", "dtype": "fp32", "max_length": 128, "dim": 384}, transform=lst,
                    quantizer=q, fit_sample_size=len(real_embeddings), training={"history": history})
    sub.save(tmp_path / "s")
    loaded = Substrate.load(tmp_path / "s")
    assert loaded.transform.kind == "lst" and loaded.fingerprint == sub.fingerprint
    assert np.array_equal(loaded.encode(real_embeddings), sub.encode(real_embeddings))
    # the LST settings are part of the fingerprint
    other = Substrate(embedding=sub.embedding, transform=type(lst).from_state(
        {**lst.params(), "lr": 0.5}, lst.state()), quantizer=q, fit_sample_size=sub.fit_sample_size)
    assert other.compute_fingerprint() != sub.fingerprint


def test_the_lst_is_an_estimator(real_embeddings):
    """fit returns self; the learned state ends in _ and is there only after fit."""
    from hermes.errors import NotFittedError

    lst = LearnedSemanticTransform(LSTSettings(epochs=1, batch_size=128),
                                   ResidualQuantizer(codebook_size=4, min_points_per_code=5))
    with pytest.raises(NotFittedError):
        lst.transform(real_embeddings)
    assert lst.fit(real_embeddings) is lst
    assert lst.W_.shape == (384, 384) and lst.quantizer_.sizes_ == [4, 4, 4] and len(lst.history_) == 1


def test_the_lst_starts_at_the_identity(real_embeddings):
    """With no training step, W is the identity and b zero: the transform is the unit embedding."""
    lst = LearnedSemanticTransform(LSTSettings(epochs=1, max_steps=0),
                                   ResidualQuantizer(codebook_size=4, min_points_per_code=5)).fit(real_embeddings)
    assert np.array_equal(lst.W_, np.eye(384, dtype=np.float32)) and not lst.b_.any()
    np.testing.assert_allclose(lst.transform(real_embeddings), real_embeddings, atol=1e-6)


def test_config_lst_settings_reach_the_fitted_transform(sample_records, tmp_path):
    """lst_weights and the training length in a config file are what the substrate was fitted with."""
    from hermes.substrate import Substrate
    from tests.conftest import invoke, write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:120])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lst_weights: {structure: 3.5, commitment: 0.5}\nlst_epochs: 2\nlst_lr: 0.002\n")
    r = invoke("fit", corpus, "--out", tmp_path / "f", "--config", cfg, "--max-length", "32", "--quiet",
               "--encoder", "transformer")
    assert r.exit_code == 0, r.output
    sub = Substrate.load(tmp_path / "f" / "substrate")
    s = sub.transform.settings
    assert (s.w_structure, s.w_commitment, s.w_reconstruction, s.epochs, s.lr) == (3.5, 0.5, 1.0, 2, 0.002)
    assert len(sub.training["history"]) <= 2


def test_codewords_follow_the_ema_and_dead_ones_are_reset(real_embeddings):
    """After training, a stage-1 codeword is an exponential moving average of unit vectors (norm
    below 1, and moved from its k-means start); with every codeword counted dead at every step,
    each is reset to one residual of the batch (a unit vector at stage 1)."""
    q = ResidualQuantizer(codebook_size=6, min_points_per_code=5, seed=2)
    start = ResidualQuantizer(codebook_size=6, min_points_per_code=5, seed=2).fit(real_embeddings).codebooks_[0]
    ema = LearnedSemanticTransform(LSTSettings(epochs=3, batch_size=64), q, seed=2).fit(real_embeddings)
    norms = np.linalg.norm(ema.quantizer_.codebooks_[0], axis=1)
    assert np.all(norms < 0.999) and not np.allclose(ema.quantizer_.codebooks_[0], start, atol=1e-3)
    reset = LearnedSemanticTransform(LSTSettings(epochs=1, batch_size=64, dead_threshold=1e9), q,
                                     seed=2).fit(real_embeddings)
    np.testing.assert_allclose(np.linalg.norm(reset.quantizer_.codebooks_[0], axis=1), 1.0, atol=1e-5)
