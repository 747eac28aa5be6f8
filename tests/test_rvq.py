"""The residual quantizer: checked by orderings and against a slow reference, on real embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from hermes.errors import NotFittedError
from hermes.rvq import ResidualQuantizer, capped_codebook_size, plan_codebook_sizes


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


@pytest.mark.parametrize("n_docs, sizes", [
    (3_000, [4, 5, 75]),            # the bundled sample
    (18_814, [12, 12, 65]),         # the dev corpus
    (1_000_000, [88, 88, 64]),
    (50_000_000, [256, 256, 256]),  # HERMES's scale keeps HERMES's sizes
])
def test_size_rule_picks_the_stages_together_from_the_corpus_size(n_docs, sizes):
    got, why = plan_codebook_sizes(n_docs, min(n_docs, 200_000))
    assert got == sizes and f"size rule for {n_docs:,} documents" in why
    l12 = sizes[0] * sizes[1]
    assert l12 <= n_docs / 128 or l12 == 256 * 256            # an L12 cell holds >= 128 documents on average
    assert sizes[0] * sizes[1] * sizes[2] <= n_docs / 2 or sizes == [256, 256, 256]


def test_size_rule_uses_the_corpus_not_the_fit_sample():
    # the same 20,000-document fit sample: a larger corpus gets larger codebooks
    assert plan_codebook_sizes(100_000, 20_000)[0] < plan_codebook_sizes(10_000_000, 20_000)[0]


def test_size_rule_with_a_fixed_stage_and_overrides():
    # 3 sources first: the learned stages below share the L12 and L123 targets
    assert plan_codebook_sizes(3_000, 3_000, fixed={0: 3})[0] == [3, 7, 71]
    assert plan_codebook_sizes(3_000, 3_000, codebook_size=16) == ([16, 16, 16], "16/16/16 codewords (codebook_size)")
    sizes, why = plan_codebook_sizes(3_000, 3_000, codebook_sizes=[8, 200, 4])
    assert sizes == [8, 76, 4] and "capped at 3,000 // 39 = 76" in why and "stage 2 from 200" in why


def test_quantizer_fits_one_size_per_stage(real_embeddings):
    q = ResidualQuantizer(codebook_size=[3, 5, 2], min_points_per_code=5, seed=0).fit(real_embeddings)
    assert q.sizes_ == [3, 5, 2]
