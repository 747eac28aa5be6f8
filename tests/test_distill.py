"""The distilled fast labeler: trained from a store, accepted by `hermes label`, no embedding model."""

from __future__ import annotations

import json
import os
import shutil

import duckdb
import numpy as np
import pytest

from tests.conftest import invoke, write_jsonl


@pytest.mark.parametrize("student", ["linear", "fasttext"])
def test_distill_then_label_without_the_encoder(e2e, tmp_path, monkeypatch, student):
    bound = ["--max-system", "30000"] if student == "linear" else []
    r = invoke("distill", "--db", e2e["db"], "--out", tmp_path / "fast", "--holdout", "0.2", "--student", student,
               *bound, "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    a = d["agreement"]
    assert d["holdout_docs"] == 60
    # the reported agreement is what the labeler does on the held-out documents, recounted here
    from hermes.distilled import load_labeler

    held = json.loads((tmp_path / "fast" / "holdout.json").read_text())
    texts = {r["id"]: r["text"] for r in e2e["records"]}
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    teacher_codes = {x[0]: x[1:] for x in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall()}
    con.close()
    truth = np.array([teacher_codes[h] for h in held])
    pred = load_labeler(tmp_path / "fast").encode_texts([texts[h] for h in held])
    for lv, name in ((1, "L1"), (2, "L12"), (3, "L123")):
        assert a[name] == pytest.approx(float((pred[:, :lv] == truth[:, :lv]).all(axis=1).mean()), abs=1e-4)
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    assert manifest["kind"] == "distilled" and manifest["teacher"] == e2e["summary"]["substrate"]
    assert manifest["student"] == student and len(json.loads((tmp_path / "fast" / "holdout.json").read_text())) == 60
    if student == "linear":     # the first stage's decision rule, fitted on out-of-fold predictions
        decision = manifest["settings"]["decision"]
        assert decision["stage"] == 0 and "decision_W.npy" in manifest["files"]
        assert 0 <= decision["out_of_fold_agreement"]["teacher_rule"] <= 1
        settings = manifest["settings"]           # tokens and adjacent token pairs, each with weights
        assert settings["max_system"] == 30_000
        assert settings["terms"] > 0 and settings["pairs"] > 0 and "W_pairs.npy" in manifest["files"]
        assert settings["fine"] == {"alpha": settings["fine_alpha"], "after_stage": 0}
        assert settings["context"]["docs"] == 240 and settings["context"]["token_ids"] > 1000   # < context_docs
        assert "context.npy" in manifest["files"]
        from hermes.distilled import DistilledSubstrate   # folders of earlier hermes: one prediction; tokens only

        fine = ("W_fine.npy", "W_static_fine.npy", "b_fine.npy", "W_pairs_fine.npy")
        one = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k not in fine}}
        older = {**one, "files": {k: v for k, v in one["files"].items()
                                  if k not in ("pairs.npy", "pair_idf.npy", "W_pairs.npy")}}
        texts = [r["text"] for r in e2e["records"]]
        codes = DistilledSubstrate(tmp_path / "fast", manifest).encode_texts(texts)
        one_prediction = DistilledSubstrate(tmp_path / "fast", one).encode_texts(texts)
        tokens_only = DistilledSubstrate(tmp_path / "fast", older).encode_texts(texts)
        pre = tmp_path / "pre-context"                  # before context vectors: the static part alone
        shutil.copytree(tmp_path / "fast", pre)
        width = np.load(pre / "static.npy").shape[1]
        for name in ("W_static", "W_static_fine"):
            np.save(pre / f"{name}.npy", np.load(pre / f"{name}.npy")[:width])
        no_context = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k != "context.npy"}}
        static_only = DistilledSubstrate(pre, no_context).encode_texts(texts)
        assert codes.shape == one_prediction.shape == tokens_only.shape == static_only.shape == (len(texts), 3)
        assert (tokens_only != one_prediction).any()
        # c1 comes from the same prediction either way; the finer prediction changes c2 and c3
        assert (codes[:, 0] == one_prediction[:, 0]).all() and (codes[:, 1:] != one_prediction[:, 1:]).any()

    # labeling must not touch the embedding model
    import hermes.embed

    def no_encoder(*args, **kwargs):
        raise AssertionError("the distilled labeler loaded the embedding model")
    monkeypatch.setattr(hermes.embed.Embedder, "setup", no_encoder)
    corpus = write_jsonl(tmp_path / "c.jsonl", e2e["records"][:80], ["{bad json"])
    r = invoke("label", corpus, "--substrate", tmp_path / "fast", "--out", tmp_path / "out", "--format", "json",
               "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["labeled"] == 80 and s["rejected"] == 1 and s["substrate"] == d["fingerprint"]
    con = duckdb.connect(str(tmp_path / "out" / "labels.duckdb"), read_only=True)
    mine = dict((x[0], x[1:]) for x in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall())
    con.close()
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    teacher = dict((x[0], x[1:]) for x in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall())
    l12 = set(con.execute("SELECT c1, c2 FROM cells_l12").fetchall())
    con.close()
    if student == "fasttext":       # hierarchical decoding: codes are paths the teacher's store has
        assert all((c[0], c[1]) in l12 for c in mine.values())
    agree = sum(mine[k][0] == teacher[k][0] for k in mine) / len(mine)
    assert agree > 0.5                                               # most of these were in its training data


@pytest.mark.parametrize("args, message", [
    (["--student", "knn"], "unknown student 'knn'"),
    (["--epochs", "5"], "--epochs: the linear student has no epochs"),
    (["--student", "fasttext", "--max-system", "30000"], "--max-system: the fasttext student has no ridge system"),
    (["--max-system", "100"], "--max-system 100: at least 2,000"),
])
def test_distill_refuses_options_its_student_does_not_have(e2e, tmp_path, args, message):
    r = invoke("distill", "--db", e2e["db"], "--out", tmp_path / "fast", *args)
    assert r.exit_code != 0 and message in r.output
    assert not (tmp_path / "fast").exists()


# --------------------------------------------------------------------------- the linear student's parts

@pytest.fixture(scope="module")
def encoder():
    from hermes.embed import Embedder

    return Embedder(max_length=64, dtype="fp32", device="cpu").setup()


def test_token_bags_read_exactly_the_teachers_window(encoder, sample_records, monkeypatch):
    from tokenizers import Tokenizer

    from hermes.distilled import TokenBags, weigh

    window = encoder.content_window()
    assert window == 62                                   # 64 less [CLS] and [SEP]
    full = Tokenizer.from_str(encoder.fast_tokenizer_json())
    full.no_truncation()
    full.no_padding()
    texts = [r["text"] for r in sample_records[:40]]
    texts += ["", "word " * 100, "x" * 5000, "ünïcödé " * 30 + "y" * 3000,   # a cut inside a long word
              ("abc " * (window - 1)) + "supercalifragilistic" * 40]          # the window ends inside it
    bags = TokenBags(encoder.fast_tokenizer_json(), window, 30522)
    bags.cut = 300                                       # force cuts, so the fallback is exercised
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")           # as the encoder leaves it
    read = bags.ids(texts)                               # with the tokenizer's threads on, for the call only
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false"
    for text, ids in zip(texts, read):
        assert ids.tolist() == full.encode(text, add_special_tokens=False).ids[:window]
    X = weigh(bags.counts(ids=read), np.ones(30522, dtype=np.float32))
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    assert norms[40] == 0 and np.allclose(np.delete(norms, 40), 1, atol=1e-5)


def test_token_vectors_are_the_encoders_embedding_of_the_token_alone(encoder):
    words = ["house", "river", "music"]
    ids = [encoder._st.tokenizer.convert_tokens_to_ids(w) for w in words]
    V = encoder.token_vectors(ids)
    np.testing.assert_allclose(V, encoder.encode(words), atol=1e-5)


def test_context_sums_are_the_encoders_outputs_of_each_token_before_pooling(encoder, sample_records):
    from hermes.vectors import unit_rows as normalize

    texts = [r["text"] for r in sample_records[:5]] + ["house river music"]
    sums, counts, _, _ = encoder.context_sums(texts, 30522)
    ids = [encoder._st.tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    assert counts.sum() == sum(map(len, ids))                              # every token read, specials too
    assert np.array_equal(counts, np.bincount(np.concatenate(ids), minlength=30522))
    one, n, _, _ = encoder.context_sums(texts[-1:], 30522)                      # one text: its mean pool
    np.testing.assert_allclose(normalize(one.sum(0, keepdims=True) / n.sum()), encoder.encode(texts[-1:]), atol=1e-5)
    # batched by length with padding, the sums are still those of each text alone
    alone = sum(encoder.context_sums([t], 30522)[0] for t in texts)
    np.testing.assert_allclose(sums, alone, atol=1e-4)


def test_context_spans_are_parts_of_what_the_encoder_read_with_its_mean_output_over_each(encoder, sample_records):
    from hermes.vectors import unit_rows as normalize

    text = max((r["text"] for r in sample_records), key=len)
    read = encoder._st.tokenizer(text, truncation=True, max_length=64)["input_ids"]
    content = read[1:-1]                                                    # [CLS] ... [SEP]
    whole = encoder.context_sums([text], 30522, span_parts=(1, 2, 3))
    spans = whole.spans
    assert list(spans.lengths) == [62, 31, 31, 21, 21, 20]
    assert list(spans.ids[:62]) == content and list(spans.ids[62:124]) == content
    assert list(spans.texts) == [0] * 6                                    # all of the one text
    # one part: the mean of the content's output vectors, i.e. all the sums less the special tokens'
    content_sum = whole.sums.sum(0) - whole.sums[read[0]] - whole.sums[read[-1]]
    np.testing.assert_allclose(spans.targets[0], normalize(content_sum[None])[0], atol=1e-5)
    assert not np.allclose(spans.targets[1], spans.targets[2], atol=1e-2)   # the halves differ
    short = encoder.context_sums(["house river"], 30522, span_parts=(2,)).spans
    assert len(short.lengths) == 0 and len(short.targets) == 0             # under 2 x SPAN_MIN tokens


def test_context_vectors_are_means_where_seen_and_mapped_from_the_static_vectors_elsewhere():
    from hermes.distill import _context_vectors

    rng = np.random.default_rng(0)
    static = rng.normal(size=(50, 4)).astype(np.float32)
    A, c = rng.normal(size=(4, 3)), rng.normal(size=3)
    seen = np.arange(50) < 30
    means = static @ A + c + rng.normal(scale=0.01, size=(50, 3))          # near a linear map of them

    class Encoder:                # only the sums it returns matter here
        def context_sums(self, texts, vocab):
            from hermes.embed import ContextPass

            counts = np.where(seen, 1 + np.arange(vocab) % 3, 0).astype(np.float64)
            return ContextPass(means * counts[:, None], counts, None, None)

    out, info = _context_vectors(Encoder(), ["a", "b"], static, lambda m: None)
    assert info == {"docs": 2, "token_ids": 30}
    np.testing.assert_allclose(out[:30], means[:30], rtol=1e-5)                 # seen: their own means
    np.testing.assert_allclose(out[30:], static[30:] @ A + c, atol=0.05)     # unseen: the fitted map
    assert np.abs(out[30:] - means[30:]).max() > 1e-3                        # ... not the means they lack


@pytest.mark.parametrize("n", [30, 400])          # more features than documents (dual), and fewer (primal)
def test_ridge_matches_scikit_learn_in_both_spaces(n):
    import scipy.sparse as sp
    from sklearn.linear_model import Ridge

    from hermes.ridge import ridge

    rng = np.random.default_rng(0)
    Xs = sp.random(n, 120, density=0.1, random_state=1, format="csr", dtype=np.float64)
    D = rng.normal(size=(n, 8))
    Y = rng.normal(size=(n, 5))
    Ws, Wd, b = ridge(Xs, D, Y, 0.5)
    ref = Ridge(alpha=0.5).fit(np.hstack([Xs.toarray(), D]), Y)
    np.testing.assert_allclose(np.vstack([Ws, Wd]), ref.coef_.T, atol=1e-4)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-4)


def test_the_in_place_cholesky_solve_spans_blocks_and_refuses_an_indefinite_system():
    import torch

    from hermes.ridge import cholesky_solve
    from hermes.errors import HermesError

    rng = np.random.default_rng(3)
    X = rng.normal(size=(2500, 40))
    A = X @ X.T + 0.5 * np.eye(2500)                     # 3 blocks of 1024
    B = rng.normal(size=(2500, 6))
    got = cholesky_solve(torch.from_numpy(A.copy()), torch.from_numpy(B)).numpy()
    np.testing.assert_allclose(A @ got, B, atol=1e-8)
    bad = A.copy()
    bad[2000, 2000] = -1.0
    with pytest.raises(HermesError, match="not positive definite"):
        cholesky_solve(torch.from_numpy(bad), torch.from_numpy(B))


def test_gram_matrices_summed_by_blocks_equal_the_products():
    import scipy.sparse as sp

    from hermes.ridge import add_gram, add_outer

    A = sp.random(300, 40, density=0.2, random_state=2, format="csr", dtype=np.float64)
    G = np.ones((50, 50))
    add_gram(G[5:45, 5:45], A, budget=60)               # a view, many blocks of rows
    want = np.ones((50, 50))
    want[5:45, 5:45] += (A.T @ A).toarray()
    np.testing.assert_allclose(G, want, atol=1e-12)
    K = np.zeros((300, 300))
    add_outer(K, A, block=7)
    np.testing.assert_allclose(K, (A @ A.T).toarray(), atol=1e-12)


def test_the_ridge_system_stays_within_its_size_when_documents_are_many():
    from hermes.distill import LINEAR_SETTINGS, _caps

    s = {**LINEAR_SETTINGS, "max_terms": 24_000, "max_pairs": 100_000, "max_system": 40_000}
    assert _caps(17_000, 384, s) == (24_000, 100_000)        # fewer documents: the n x n system
    assert _caps(200_000, 384, s) == (24_000, 40_000 - 384 - 24_000)   # the tokens first, pairs the rest
    assert _caps(200_000, 384, {**s, "max_terms": 50_000}) == (40_000 - 384, 0)
    assert _caps(200_000, 384, {**s, "max_terms": 10_000, "max_pairs": 10_000}) == (10_000, 10_000)


def test_token_pairs_weigh_like_tfidf_and_keep_the_frequent_ones():
    from hermes.distilled import PairBlock, token_pairs

    V = 10
    ids = [np.array([1, 2, 1, 2, 3]), np.array([1, 2]), np.array([5]), np.array([], dtype=np.int64),
           np.array([4, 5, 4, 5])]
    rows, keys, counts = token_pairs(ids, V)
    assert list(zip(rows, keys, counts)) == [(0, 12, 2), (0, 21, 1), (0, 23, 1), (1, 12, 1), (4, 45, 2), (4, 54, 1)]
    block = PairBlock.fit(ids, V, min_df=2, max_pairs=10, scale=2.0)
    assert block.kept.tolist() == [12]                   # the only pair of two documents
    n = len(ids)
    idf12, other = np.log((1 + n) / 3) + 1, np.log((1 + n) / 2) + 1
    assert block.idf[0] == pytest.approx(idf12) and block.other_idf == pytest.approx(other)
    X = block.matrix(ids).toarray()
    assert X.shape == (5, 1)
    w = np.array([(1 + np.log(2)) * idf12, other, other])      # row 0: 1-2 twice, 2-1 and 2-3 once
    assert X[0, 0] == pytest.approx(2.0 * w[0] / np.linalg.norm(w), rel=1e-6)
    assert X[1, 0] == pytest.approx(2.0) and X[2, 0] == X[3, 0] == X[4, 0] == 0
    assert block.matrix([np.array([7, 8])]).nnz == 0     # a pair never seen: its row stays empty


def test_a_linear_student_of_an_earlier_hermes_is_refused(tmp_path):
    from hermes.distilled import DistilledSubstrate
    from hermes.errors import HermesError

    manifest = {"student": "linear", "fingerprint": "x", "data": {"train_docs": 1}, "agreement": {},
                "classes": [4, 4, 4], "files": {"vocabulary.json": "", "W.npy": ""}, "settings": {}}
    with pytest.raises(HermesError, match="distill` again|earlier hermes"):
        DistilledSubstrate(tmp_path, manifest).setup()


def test_the_decision_rule_starts_at_the_teachers_rule_and_learns_the_students_errors():
    from hermes.distilled import DecisionRule
    from hermes.ridge import logistic
    from hermes.vectors import unit_rows as normalize

    rng = np.random.default_rng(0)
    U = normalize(rng.normal(size=(6, 16)))
    prior = 40 * U

    def sample(n):          # points near their class's codeword, blurred; class 0 six times as common
        y = rng.choice(6, size=n, p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
        return normalize(U[y] + rng.normal(scale=0.7, size=(n, 16))), y

    R, y = sample(3000)
    teacher = DecisionRule(prior, np.zeros(6))
    assert np.array_equal(teacher(R), np.argmax(R @ U.T, axis=1))          # scale times unit codewords: the cosine rule
    W, b = logistic(R, y, prior, 1e6)                                        # a huge penalty keeps the prior
    np.testing.assert_allclose(W, prior, atol=1e-3)
    W, b = logistic(R, y, prior, 1e-4)
    R2, y2 = sample(3000)
    assert np.mean(DecisionRule(W, b)(R2) == y2) > np.mean(teacher(R2) == y2) + 0.03   # it learned the skew


def test_a_chosen_stage_feeds_its_codeword_to_the_residual_of_the_next():
    from hermes.rvq import ResidualQuantizer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 8)).astype(np.float32)
    q = ResidualQuantizer(stages=2, codebook_size=4, min_points_per_code=1).fit(X)
    forced = np.full(len(X), 3)
    codes = q.encode(X, choose={0: lambda R: forced})
    assert np.array_equal(codes[:, 0], forced)
    U2 = q.codebooks_[1] / np.linalg.norm(q.codebooks_[1], axis=1, keepdims=True)
    assert np.array_equal(codes[:, 1], np.argmax((X - q.codebooks_[0][3]) @ U2.T, axis=1))
    assert not np.array_equal(codes, q.encode(X))                    # the argmax would not have chosen 3 everywhere


def test_distilled_labeling_counts_tokens_as_its_teacher_did(sample_records, tmp_path):
    """A teacher store counted n_tokens with its own --tokenizer (here a cased copy of the model's,
    which counts differently); labeling with its distilled substrate counts the same way."""
    from hermes.embed import TokenCounter, resolve_model

    src, cased = resolve_model("all-MiniLM-L6-v2"), tmp_path / "cased"
    cased.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, cased / name)
    config = json.loads((cased / "tokenizer_config.json").read_text())
    (cased / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    tok = json.loads((cased / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (cased / "tokenizer.json").write_text(json.dumps(tok))
    texts = [r["text"] for r in sample_records[:200]]
    assert (TokenCounter(cased).count(texts) != TokenCounter(src).count(texts)).any()

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:200])
    r = invoke("run", corpus, "--out", tmp_path / "teacher", "--tokenizer", cased, "--codebook-sizes", "4,2,2",
               "--max-length", "64", "--quiet", "--encoder", "transformer")
    assert r.exit_code == 0, r.output
    r = invoke("distill", "--db", tmp_path / "teacher" / "labels.duckdb", "--out", tmp_path / "fast", "--student",
               "fasttext", "--epochs", "2", "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("label", corpus, "--substrate", tmp_path / "fast", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 0, r.output
    counts = []
    for db in (tmp_path / "teacher" / "labels.duckdb", tmp_path / "out" / "labels.duckdb"):
        con = duckdb.connect(str(db), read_only=True)
        counts.append(dict(con.execute("SELECT doc_id, n_tokens FROM labels").fetchall()))
        con.close()
    assert counts[0] == counts[1]


def test_spans_are_targets_only_for_a_teacher_that_mean_pools(encoder):
    pooling = next(m for m in encoder._st if hasattr(m, "pooling_mode"))
    assert encoder.mean_pooled()
    before = pooling.pooling_mode
    try:
        pooling.pooling_mode = "cls"            # a span's mean output is not what such a teacher pools
        assert not encoder.mean_pooled()
    finally:
        pooling.pooling_mode = before
