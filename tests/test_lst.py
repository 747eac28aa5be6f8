"""The Learned Semantic Transform trained with the codebooks, on real embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from hermes.lst import LSTSettings, fit_lst_rvq
from hermes.rvq import ResidualQuantizer
from hermes.substrate import Substrate


@pytest.fixture(scope="module")
def trained(real_embeddings):
    q = ResidualQuantizer(codebook_size=16, min_points_per_code=5, seed=0)
    return fit_lst_rvq(real_embeddings, q, LSTSettings(epochs=8, batch_size=128), seed=0)


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
    runs = [fit_lst_rvq(real_embeddings, ResidualQuantizer(codebook_size=8, min_points_per_code=5, seed=1),
                        LSTSettings(epochs=3, batch_size=128), seed=1) for _ in range(2)]
    assert np.array_equal(runs[0][0].W_, runs[1][0].W_)
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1].codebooks_, runs[1][1].codebooks_))


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
