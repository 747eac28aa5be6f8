"""A distilled fast labeler: a store's code predicted from text alone, without the transformer.

`distill` trains a student on (text, teacher) pairs of a labeled store and its corpus and saves it
as a substrate of kind `distilled` that `hermes label` accepts; labeling with it needs no
embedding model. Two students:

- `linear` (the default): a linear encoder over the teacher's own tokens. A document is the bag
  of token ids the teacher's tokenizer gives for the teacher's window (what the encoder reads), as
  TF-IDF, and the bag of its adjacent token pairs, as TF-IDF of their own. A weight row per
  frequent token id and per frequent pair plus a static part (the TF-IDF-weighted sum of each
  token's static vector, the teacher's embedding of the token alone, times a matrix) and a
  context part (the same sum of each token's context vector, the mean of the teacher's output
  vectors of the token in up to `context_docs` training documents, times a matrix) predict the
  document's point h in the teacher's transformed space (the LST output of its embedding); ridge
  regression fits them together exactly. The teacher's own codebooks then quantize the
  prediction, so codes are the teacher's RVQ of an approximate h. The first learned stage alone
  decides by a rule fitted to the student's errors (DecisionRule: logistic regression on
  out-of-fold predictions, starting from and held near the teacher's cosine argmax); the
  teacher's rule, made for exact points, is not the best one for approximate ones. The stages
  after it quantize a second prediction, the same ridge less regularised (`fine_alpha`): the
  finer codes need detail that the first stage's best penalty shrinks away. A fixed stage of the
  teacher (a source, a taxonomy) keeps its code from the document, as the teacher did. It needs
  the teacher's embeddings of the training documents: the kept ones (`--keep-embeddings`), else
  they are computed with the teacher's encoder.
- `fasttext`: three fastText classifiers, for c1, the L12 cell and the L123 cell. Decoding is
  hierarchical, so codes always form a path seen in training: c1 is the L1 model's top label;
  (c1, c2) the L12 model's best label under c1 (among its top 20; else c1's most common child in
  the training data); c3 likewise under (c1, c2).

Held-out agreement with the teacher substrate is measured at each level and kept in the manifest,
with the held-out doc_ids (holdout.json) so a benchmark can time the same documents.
"""


from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hermes._version import __version__
from hermes.cellkeys import LEVELS
from hermes.distilled import (LEVEL_KEYS, STUDENTS, DecisionRule, DistilledSubstrate, PairBlock, TokenBags,
                              level_key, static_part, token_pairs, weigh)
from hermes.errors import HermesError
from hermes.fasttext_quality import normalise, train_supervised
from hermes.files import replacing, sha256
from hermes.ridge import logistic, ridge
from hermes.static import context_vectors
from hermes.substrate import FORMAT, FORMAT_VERSION, load_for_store



def _teacher_stack(con) -> list[dict[str, Any]] | None:
    """The teacher's stage stack with its fixed stages' class names, so that a store labeled by the
    distilled labeler names its cells as the teacher's store does."""
    from hermes.store import stage_names

    names = stage_names(con)
    if not names:
        return None
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'substrates'").fetchall()]
    stored = json.loads(con.execute("SELECT stages FROM substrates").fetchall()[0][0] or "null") \
        if "stages" in cols else None
    stack = stored or [{"kind": "learned"} for _ in range(3)]
    return [{**st, "classes": names[i]} if i in names else st for i, st in enumerate(stack)]


def distill(db: str | Path, out: str | Path, corpus: list[str] | None = None, sample: int = 200_000,
            holdout: float = 0.1, epochs: int | None = None, student: str = "linear", seed: int = 0,
            substrate: str | Path | None = None, max_system: int | None = None,
            progress=None) -> dict[str, Any]:
    from hermes.read import lookup
    from hermes.store import connect, info_fields, label_count, labels_at, store_info

    if student not in STUDENTS:
        raise HermesError(f"unknown student '{student}'", hint=f"valid: {', '.join(STUDENTS)}")
    if epochs is not None and student != "fasttext":
        raise HermesError(f"--epochs: the {student} student has no epochs (it is solved exactly)",
                          hint="--epochs sets the fasttext student's training length")
    if max_system is not None and student != "linear":
        raise HermesError(f"--max-system: the {student} student has no ridge system",
                          hint="--max-system bounds the linear student's memory")
    if max_system is not None and max_system < MIN_SYSTEM:
        raise HermesError(f"--max-system {max_system}: at least {MIN_SYSTEM:,}",
                          hint="the system holds the static and context parts' dimensions and some token ids")
    say = progress or (lambda m: None)
    db, out = Path(db), Path(out)
    con = connect(db)
    try:
        fps = [r[0] for r in con.execute("SELECT DISTINCT substrate FROM labels").fetchall()]
        total = label_count(con)
        rng = random.Random(seed)         # the sample, then the shuffle of the held-out split
        rows = range(total) if total <= sample else sorted(rng.sample(range(total), sample))
        t = labels_at(con, rows)          # the sample's rows only, not every doc_id of the store
        stack = _teacher_stack(con)
        embeddings = [json.loads(r[0]) for r in con.execute("SELECT embedding FROM substrates").fetchall()]
        encoders = [e.get("encoder") for e in embeddings]
    finally:
        con.close()
    if len(fps) != 1:
        raise HermesError(f"{db}: the store holds labels of {len(fps)} substrates", hint="distill one substrate's store")
    if "static" in encoders:
        raise HermesError(f"{db}: the store was labeled with a static encoder, which is already fast (field "
                          f"'embedding.encoder')", hint="label more data with `hermes label --substrate`; to distill, "
                                                        "label with `hermes run --encoder transformer` first")
    teacher = load_for_store(db, substrate) if student == "linear" else None
    info = store_info(db)
    # what counted n_tokens in the teacher's store: its --tokenizer, else its embedding model's tokenizer
    counted_with = info.get("tokenizer") if info.get("tokenizer") not in (None, "the embedding model's") \
        else embeddings[0].get("model")
    ids = t.column("doc_id").to_pylist()
    codes = np.stack([t.column(c).to_numpy() for c in ("c1", "c2", "c3")], axis=1)
    say(f"distill: reading the text of {len(ids):,} documents")
    found = lookup(corpus or info.get("inputs", []), info_fields(info), set(ids))
    docs = [(d, found[d]["text"], c) for d, c in zip(ids, codes) if d in found]
    if len(docs) < 20:
        raise HermesError(f"only {len(docs)} documents of the store were found in the corpus",
                          hint="pass the corpus the store was built from with --corpus")
    rng.shuffle(docs)
    n_test = max(1, int(len(docs) * holdout))
    test, train = docs[:n_test], docs[n_test:]
    with replacing(out) as (tmp,):
        tmp.mkdir()
        t0 = time.perf_counter()
        if student == "linear":
            settings, extra = _train_linear(train, teacher, db, tmp, seed, say, max_system)
            classes = list(teacher.sizes)
        else:
            settings, extra = _train_fasttext(train, tmp, epochs or 25, seed, say)
            classes = [len(set(level_key(c, lv) for _, _, c in train)) for lv in LEVELS]
        train_seconds = time.perf_counter() - t0
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "distilled", "student": student,
                    "teacher": fps[0], "hermes_version": __version__,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": settings,
                    "data": {"store": str(db), "train_docs": len(train), "holdout_docs": len(test)},
                    "classes": classes, **extra, "agreement": {}, "stages": stack, "n_tokens_tokenizer": counted_with,
                    "files": {name: sha256(tmp / name) for name in files}}
        manifest["fingerprint"] = hashlib.sha256(json.dumps(
            {"teacher": fps[0], "student": student, "settings": settings, "files": manifest["files"]},
            sort_keys=True).encode()).hexdigest()[:16]
        sub = DistilledSubstrate(tmp, manifest)
        truth = np.stack([c for _, _, c in test])
        fixed = {i: truth[:, i].astype(np.int64) for i in sub.fixed}   # read from each document, not predicted
        sub.encode_texts([text for _, text, _ in test[:16]], {i: c[:16] for i, c in fixed.items()})   # loads it
        t0 = time.perf_counter()
        pred = sub.encode_texts([text for _, text, _ in test], fixed)
        predict_s = time.perf_counter() - t0
        manifest["agreement"] = {name: round(float((pred[:, :lv] == truth[:, :lv]).all(axis=1).mean()), 4)
                                 for lv, name in ((1, "L1"), (2, "L12"), (3, "L123"))}
        manifest["train_seconds"] = round(train_seconds, 1)
        manifest["holdout_docs_per_s"] = round(len(test) / max(predict_s, 1e-9), 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "holdout.json").write_text(json.dumps([d for d, _, _ in test]) + "\n")
    return {"out": str(out), "student": student, "fingerprint": manifest["fingerprint"], "teacher": fps[0],
            "agreement": manifest["agreement"], "classes": manifest["classes"], "train_docs": len(train),
            "holdout_docs": len(test), "train_seconds": manifest["train_seconds"],
            "holdout_docs_per_s": manifest["holdout_docs_per_s"]}


def _train_fasttext(train: list, tmp: Path, epochs: int, seed: int, say) -> tuple[dict, dict]:
    # unigrams and 25 epochs: on the dev corpus (256 L1 cells) bigrams or 10 epochs underfit badly
    settings = {"epoch": epochs, "dim": 100, "bucket": 200_000, "wordNgrams": 1, "minCount": 2, "lr": 0.5,
                "seed": seed, "thread": 1}
    used_seed: dict[str, int] = {}
    for level, key in enumerate(LEVEL_KEYS, start=1):
        say(f"distill: training the {key.upper()} classifier on {len(train):,} documents")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            for _, text, c in train:
                f.write(f"__label__{level_key(c, level)} {normalise(text)}\n")
            name = f.name
        try:
            _, used_seed[key] = train_supervised(name, tmp / f"{key}.bin", loss="softmax" if level == 1 else "hs",
                                                 **settings)
        finally:
            os.unlink(name)
    counts12: dict[str, dict[str, int]] = {}
    counts123: dict[str, dict[str, int]] = {}
    for _, _, c in train:
        k1, k12, k123 = level_key(c, 1), level_key(c, 2), level_key(c, 3)
        counts12.setdefault(k1, {}).setdefault(k12, 0)
        counts12[k1][k12] += 1
        counts123.setdefault(k12, {}).setdefault(k123, 0)
        counts123[k12][k123] += 1
    # every label a model can emit came from the training data, so each has a fallback child
    fallback = {"l12": {k: max(v, key=v.get) for k, v in counts12.items()},
                "l123": {k: max(v, key=v.get) for k, v in counts123.items()}}
    return {**settings, "seed_used": used_seed}, {"fallback": fallback}


# The linear student's settings, chosen on the dev corpus's training split (the variants tried
# and their held-out agreement are in docs/benchmarks.md, "The distilled student").
LINEAR_SETTINGS = {"alpha": 0.6, "min_df": 2, "max_terms": 24_000, "max_pairs": 64_000, "pair_scale": 1.0,
                   "static_scale": 3.0, "max_system": 40_000, "fine_alpha": 0.15, "context_docs": 5_000}
MIN_SYSTEM = 2_000          # the least --max-system: the static and context parts' dimensions and some token ids
# The decision rule of the first learned stage (DecisionRule): fitted on out-of-fold predictions
# of `folds` ridge fits; its penalty is chosen among `lambdas` on a fifth of them held out.
DECISION_SETTINGS = {"folds": 5, "scale": 40.0, "lambdas": [1e-4, 3e-4, 1e-3]}


def _context_vectors(encoder, texts: list[str], static: np.ndarray, say) -> tuple[np.ndarray, dict[str, Any]]:
    """A context vector per token id: the mean of the teacher's output vectors of the token (before
    pooling) over `texts`, so what the token comes to mean in the documents, where the static vector
    is the token alone. Ids the texts lack get the least-squares linear map of their static vector
    (hermes.static.context_vectors, as the static encoder does)."""
    say(f"distill: the teacher's context vectors of its tokens, over {len(texts):,} documents")
    context = encoder.context_sums(texts, static.shape[0])
    sums, counts = context.sums, context.counts
    out = context_vectors(sums, counts, static)
    return out.astype(np.float32), {"docs": len(texts), "token_ids": int((counts > 0).sum())}


def _teacher_points(teacher, db: Path, train: list, say) -> np.ndarray:
    """The teacher's transformed point h of every training document: from the kept embeddings,
    else embedded again with the teacher's encoder settings."""
    from hermes.layout import cached_embeddings

    E = cached_embeddings(db.parent / "embeddings", [d for d, _, _ in train])
    if E is None:
        say(f"distill: embedding {len(train):,} documents with the teacher's encoder (no kept embeddings)")
        E = teacher.embedder().encode([text for _, text, _ in train]).astype(np.float16)
    return teacher.transform.transform(np.asarray(E, dtype=np.float32))


def _train_linear(train: list, teacher, db: Path, tmp: Path, seed: int, say,
                  max_system: int | None = None) -> tuple[dict, dict]:
    import scipy.sparse as sp

    from hermes.vectors import unit_rows

    s = {**LINEAR_SETTINGS, **({"max_system": int(max_system)} if max_system is not None else {})}
    H = _teacher_points(teacher, db, train, say)
    encoder = teacher.embedder()
    say("distill: the teacher's static token vectors")
    static = encoder.token_vectors()
    tokenizer_json, window = encoder.fast_tokenizer_json(), encoder.content_window()
    bags = TokenBags(tokenizer_json, window, static.shape[0])
    texts = [text for _, text, _ in train]
    context, context_info = None, None
    if s["context_docs"] > 0:
        pick = np.sort(np.random.default_rng(seed).permutation(len(texts))[:s["context_docs"]])
        context, context_info = _context_vectors(encoder, [texts[i] for i in pick], static, say)
    ids = bags.ids(texts)
    C = bags.counts(ids=ids)
    n = C.shape[0]
    df = np.bincount(C.indices, minlength=C.shape[1])
    idf = (np.log((1 + n) / (1 + df)) + 1).astype(np.float32)        # smooth idf, as scikit-learn's
    X = weigh(C, idf)
    D = static_part(X, static, context) * s["static_scale"]
    max_terms, max_pairs = _caps(n, D.shape[1], s)
    frequent = np.flatnonzero(df >= s["min_df"])
    keep = np.sort(frequent[np.argsort(-df[frequent], kind="stable")[:max_terms]])
    found = token_pairs(ids, static.shape[0])
    pairs = PairBlock.fit(ids, static.shape[0], s["min_df"], max_pairs, s["pair_scale"], found)
    Xk = sp.hstack([X[:, keep], pairs.matrix(ids, found)], format="csr")
    say(f"distill: ridge regression over {len(keep):,} token ids, {len(pairs.kept):,} token pairs and "
        f"{D.shape[1]} static{' and context' if context is not None else ''} dimensions, {n:,} documents")
    W_terms, W_static, b = ridge(Xk, D, H, s["alpha"])
    (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    arrays = {"idf": idf, "static": static.astype(np.float16), "pairs": pairs.kept, "pair_idf": pairs.idf,
              **({} if context is None else {"context": context.astype(np.float16)}),
              **_weights(W_terms, W_static * s["static_scale"], b, keep, static.shape[0])}
    P = np.asarray(Xk @ W_terms) + D @ W_static + b
    fit = float(np.mean(np.sum(unit_rows(P) * H, axis=1)))
    settings = {**s, "window": window,
                "features": "teacher tokenizer, window; tokens, adjacent token pairs, static "
                            + ("and context vectors" if context is not None else "vectors"),
                "terms": int(len(keep)), "pairs": int(len(pairs.kept)), "pair_other_idf": pairs.other_idf,
                "vocab": int(static.shape[0]), "seed": seed,
                **({} if context_info is None else {"context": context_info})}
    stages = len(teacher.quantizer.codebooks_)
    stage = next((i for i in range(stages) if i not in teacher.quantizer.fixed), None)
    if stage is not None and any(i not in teacher.quantizer.fixed for i in range(stage + 1, stages)):
        say(f"distill: ridge regression for the finer stages (alpha {s['fine_alpha']:g})")
        W_terms, W_static, b = ridge(Xk, D, H, s["fine_alpha"])
        arrays.update(_weights(W_terms, W_static * s["static_scale"], b, keep, static.shape[0], "_fine"))
        settings["fine"] = {"alpha": s["fine_alpha"], "after_stage": stage}
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
    for i, C_ in enumerate(teacher.quantizer.codebooks_):     # a fixed stage's: its class means
        np.save(tmp / f"codebook_{i + 1}.npy", np.asarray(C_, dtype=np.float32), allow_pickle=False)
    if DECISION_SETTINGS["folds"] > 1 and stage is not None:
        codes = np.stack([c for _, _, c in train]).astype(np.int64)
        settings["decision"] = _train_decision(Xk, D, H, codes, teacher.quantizer.codebooks_, stage, tmp,
                                               seed, say)
    return settings, {"history": [{"train_mean_cosine": round(fit, 5)}]}


def _weights(W_terms: np.ndarray, W_static: np.ndarray, b: np.ndarray, keep: np.ndarray, vocab: int,
             suffix: str = "") -> dict[str, np.ndarray]:
    """One prediction's arrays as saved: a weight row per vocabulary id (zero where not kept) and per
    kept pair, in float16; the static part's matrix and the intercept in float32. (8-bit rows with a
    scale each would save 68 MB of 165 on the dev corpus; they cost 0.0016 of L1 agreement there.)"""
    W = np.zeros((vocab, W_terms.shape[1]), dtype=np.float16)
    W[keep] = W_terms[:len(keep)]
    return {f"W{suffix}": W, f"W_pairs{suffix}": W_terms[len(keep):].astype(np.float16),
            f"W_static{suffix}": W_static.astype(np.float32), f"b{suffix}": b.astype(np.float32)}


def _caps(n: int, dims: int, s: dict[str, Any]) -> tuple[int, int]:
    """The most token ids and pairs the ridge may weigh. Its system is min(n, k) square for n
    documents and k features, which bounds memory: 8 max_system^2 bytes. When the documents
    outnumber `max_system` and the features would too, the tokens keep their cap (up to the size)
    and the pairs get what is left."""
    terms, pairs, most = s["max_terms"], s["max_pairs"], s["max_system"]
    if n > most and terms + pairs + dims > most:
        terms = min(terms, most - dims)
        pairs = min(pairs, most - dims - terms)
    return terms, pairs


def _train_decision(Xs, D: np.ndarray, H: np.ndarray, codes: np.ndarray, codebooks: list, stage: int, tmp: Path,
                    seed: int, say) -> dict[str, Any]:
    """Fit the DecisionRule of the first learned stage on out-of-fold predictions: each fold's points
    predicted by a ridge fit on the other folds, so their errors are those of unseen documents.
    The targets are the teacher's codes. Multinomial logistic regression, its weights penalised
    towards the teacher's rule; the penalty is chosen on a fifth of the documents held out, then
    the rule is refitted on all of them."""
    from hermes.vectors import unit_rows

    ds = DECISION_SETTINGS
    n, k = len(H), ds["folds"]
    fold = np.random.default_rng(seed).permutation(n) % k
    P = np.zeros_like(H, dtype=np.float32)
    for f in range(k):
        say(f"distill: decision rule, out-of-fold ridge fit {f + 1}/{k}")
        fit, out = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        W, W_static, b = ridge(Xs[fit], D[fit], H[fit], LINEAR_SETTINGS["alpha"])
        P[out] = np.asarray(Xs[out] @ W) + D[out] @ W_static + b
    R = unit_rows(P)
    for s in range(stage):                        # the fixed stages before it: the document's own codes
        R -= np.asarray(codebooks[s], dtype=np.float32)[codes[:, s]]
    R, y = unit_rows(R), codes[:, stage]
    prior = ds["scale"] * unit_rows(np.asarray(codebooks[stage], dtype=np.float32))
    teacher_rule = DecisionRule(prior, np.zeros(len(prior)))
    val = fold == 0                                # a fifth, as a fold: every fold's errors are alike
    scores = {}
    for lam in ds["lambdas"]:
        W, b = logistic(R[~val], y[~val], prior, lam)
        scores[lam] = float(np.mean(DecisionRule(W, b)(R[val]) == y[val]))
    lam = max(ds["lambdas"], key=lambda v: (scores[v], -v))
    say(f"distill: decision rule, penalty {lam:g} (held-out fifth: {scores[lam]:.3f} against "
        f"{np.mean(teacher_rule(R[val]) == y[val]):.3f} for the teacher's rule)")
    W, b = logistic(R, y, prior, lam)
    np.save(tmp / "decision_W.npy", W, allow_pickle=False)
    np.save(tmp / "decision_b.npy", b, allow_pickle=False)
    return {"stage": stage, "folds": k, "scale": ds["scale"], "lambda": lam,
            "out_of_fold_agreement": {"teacher_rule": round(float(np.mean(teacher_rule(R) == y)), 4),
                                      "decision_rule": round(float(np.mean(DecisionRule(W, b)(R) == y)), 4)}}
