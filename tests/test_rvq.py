"""The residual quantizer: checked by orderings and against a slow reference, on real embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from hermes.errors import NotFittedError
from hermes.rvq import ResidualQuantizer, capped_codebook_size


@pytest.fixture(scope="module")
def fitted(real_embeddings):
    return ResidualQuantizer(codebook_size=16, min_points_per_code=5, seed=3).fit(real_embeddings)


def test_reconstruction_error_falls_with_each_stage(fitted, real_embeddings):
    errors = fitted.reconstruction_errors(real_embeddings)
    base = float(np.mean(np.sum(real_embeddings ** 2, axis=1)))
    assert base > errors[0] > errors[1] > errors[2]


def test_codes_match_a_slow_reference_encoder(fitted, real_embeddings):
    """c1 is the stage-1 codeword of highest cosine; each later code likewise on the residual."""
    codes = fitted.encode(real_embeddings)
    for x, code in zip(real_embeddings[:50], codes[:50]):
        r = x.astype(np.float64)
        for s, C in enumerate(fitted.codebooks_):
            cos = [float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c))) for c in C.astype(np.float64)]
            assert code[s] == int(np.argmax(cos))
            r = r - C[code[s]]


def test_fit_is_deterministic_for_a_seed(real_embeddings):
    a = ResidualQuantizer(codebook_size=8, min_points_per_code=5, seed=1).fit(real_embeddings)
    b = ResidualQuantizer(codebook_size=8, min_points_per_code=5, seed=1).fit(real_embeddings)
    assert all(np.array_equal(x, y) for x, y in zip(a.codebooks_, b.codebooks_))


def test_every_codeword_is_used_on_the_fit_data(fitted, real_embeddings):
    codes = fitted.encode(real_embeddings)
    assert len(np.unique(codes[:, 0])) == fitted.sizes_[0]


@pytest.mark.parametrize("n, k, m, expected", [(300, 256, 39, 7), (1_000_000, 256, 39, 256),
                                               (10, 256, 39, 2), (3000, 64, 10, 64)])
def test_small_corpus_cap(n, k, m, expected):
    assert capped_codebook_size(n, k, m) == expected


def test_unfitted_quantizer_raises():
    with pytest.raises(NotFittedError):
        ResidualQuantizer().encode(np.zeros((2, 4), np.float32))
