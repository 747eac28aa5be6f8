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
from hermes.cellkeys import LEVELS, view_suffix
from hermes.errors import HermesError
from hermes.fasttext_quality import _fasttext, normalise, train_supervised
from hermes.files import replacing, sha256
from hermes.static import context_vectors, tokenizer_threads
from hermes.substrate import FORMAT, FORMAT_VERSION, Substrate, load_for_store, read_manifest

LEVEL_KEYS = tuple(view_suffix(level) for level in LEVELS)     # the fasttext student's models
TOP_K = 20
STUDENTS = ("linear", "fasttext")


def _key(codes, level: int) -> str:
    return ".".join(str(int(c)) for c in codes[:level])


class DistilledSubstrate:
    kind = "distilled"

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.m = manifest
        self.student = manifest.get("student", "fasttext")
        self.fingerprint = manifest["fingerprint"]
        self.fit_sample_size = manifest["data"]["train_docs"]
        self.embedding = None
        self.training = {"agreement": manifest["agreement"]}
        self._models: dict[str, Any] = {}

    @property
    def sizes(self) -> list[int]:
        return self.m["classes"]

    @property
    def n_tokens_tokenizer(self) -> str | None:
        """What counted n_tokens in the teacher's store (a tokenizer folder, or the teacher's model),
        so that labeling counts the same way; None in a folder of an earlier hermes."""
        value = self.m.get("n_tokens_tokenizer")
        if value is None or Path(value).is_dir():
            return value
        from hermes.embed import resolve_model

        return str(resolve_model(value))

    @property
    def stages(self) -> list[dict[str, Any]]:
        """The teacher's stage stack (with a fixed stage's class names)."""
        return self.m.get("stages") or [{"kind": "learned"} for _ in LEVEL_KEYS]

    @property
    def fixed(self) -> list[int]:
        """The fixed stages whose codes labeling must supply (the linear student takes them from the
        document, as the teacher did; the fastText student predicts every code)."""
        from hermes.stages import fixed_indices

        return fixed_indices(self.stages) if self.student == "linear" else []

    def setup(self) -> "DistilledSubstrate":
        if self._models:
            return self
        if self.student == "linear":
            from hermes.rvq import ResidualQuantizer

            if "tokenizer.json" not in self.m["files"]:
                raise HermesError(f"{self.path}: a linear student of an earlier hermes (words, not the "
                                  "teacher's tokens)", hint="run `hermes distill` again")
            q = ResidualQuantizer(stages=len(LEVEL_KEYS),
                                  fixed={i: len(self.stages[i]["classes"]) for i in self.fixed})
            q.codebooks_ = [np.load(self.path / f"codebook_{i + 1}.npy", allow_pickle=False)
                            for i in range(len(LEVEL_KEYS))]
            names = ["idf", "W", "static", "W_static", "b"]
            if "W_fine.npy" in self.m["files"]:           # older students: one prediction for every stage
                names += ["W_fine", "W_static_fine", "b_fine", "W_pairs_fine"]
            if "context.npy" in self.m["files"]:          # older students: no context part
                names += ["context"]
            arrays = {name: np.load(self.path / f"{name}.npy", allow_pickle=False).astype(np.float32)
                      for name in names}
            st = self.m["settings"]
            bags = TokenBags((self.path / "tokenizer.json").read_text(encoding="utf-8"), st["window"], st["vocab"])
            if "pairs.npy" in self.m["files"]:            # older students read tokens only
                arrays["pairs"] = PairBlock(np.load(self.path / "pairs.npy", allow_pickle=False),
                                            np.load(self.path / "pair_idf.npy", allow_pickle=False),
                                            st["pair_other_idf"], st["vocab"], st["pair_scale"])
                arrays["W_pairs"] = np.load(self.path / "W_pairs.npy", allow_pickle=False).astype(np.float32)
            choose = {}
            if "decision_W.npy" in self.m["files"]:
                rule = DecisionRule(np.load(self.path / "decision_W.npy", allow_pickle=False),
                                    np.load(self.path / "decision_b.npy", allow_pickle=False))
                choose = {st["decision"]["stage"]: rule}
            self._models = {"bags": bags, "quantizer": q, "choose": choose, **arrays}
        else:
            ft = _fasttext()
            self._models = {k: ft.load_model(str(self.path / f"{k}.bin")) for k in LEVEL_KEYS}
        return self

    def encode_texts(self, texts: list[str], fixed: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Codes (n, 3) from the texts; `fixed` gives the class index of each fixed stage per text
        (the linear student of a teacher with fixed stages)."""
        self.setup()
        if self.student == "linear":
            return self._encode_linear(texts, fixed)
        clean = [normalise(t) for t in texts]
        fb = self.m["fallback"]
        l1, _ = self._models["l1"].predict(clean, k=1)
        l12, _ = self._models["l12"].predict(clean, k=TOP_K)
        l123, _ = self._models["l123"].predict(clean, k=TOP_K)
        out = np.zeros((len(texts), 3), dtype=np.int16)
        for i in range(len(texts)):
            c1 = l1[i][0][len("__label__"):]
            k12 = next((lab[9:] for lab in l12[i] if lab[9:].split(".")[0] == c1), fb["l12"][c1])
            k123 = next((lab[9:] for lab in l123[i] if lab[9:].rsplit(".", 1)[0] == k12), fb["l123"][k12])
            out[i] = [int(x) for x in k123.split(".")]
        return out

    def _encode_linear(self, texts: list[str], fixed: dict[int, np.ndarray] | None) -> np.ndarray:
        from hermes.vectors import unit_rows

        m = self._models
        ids = m["bags"].ids(texts)
        X = weigh(m["bags"].counts(ids=ids), m["idf"])
        S = _static_part(X, m["static"], m.get("context"))
        XP = m["pairs"].matrix(ids) if "pairs" in m else None

        def predict(suffix: str = "") -> np.ndarray:
            h = np.asarray(X @ m[f"W{suffix}"]) + S @ m[f"W_static{suffix}"] + m[f"b{suffix}"]
            if XP is not None:
                h += np.asarray(XP @ m[f"W_pairs{suffix}"])
            return unit_rows(h.astype(np.float32))

        codes = m["quantizer"].encode(predict(), fixed=fixed, choose=m["choose"])
        if "W_fine" in m:      # the stages after the first learned one quantize the finer prediction
            first = self.m["settings"]["fine"]["after_stage"]
            keep = codes[:, first].astype(np.int64)
            codes = m["quantizer"].encode(predict("_fine"), fixed=fixed, choose={first: lambda R: keep})
        return codes

    def manifest(self) -> dict[str, Any]:
        """In the shape the store's substrates table reads."""
        m = self.m
        return {**m, "embedding": {"model": f"distilled {self.student} (teacher {m['teacher']})", "dtype": None,
                                   "max_length": None},
                "transform": {"kind": "distilled", "student": self.student},
                "rvq": {"sizes": m["classes"], "kind": self.student}, "fit_sample_size": self.fit_sample_size}


def load_labeler(path: str | Path) -> "Substrate | DistilledSubstrate":
    """What `hermes label` labels with: an embedding substrate or a distilled labeler folder."""
    path = Path(path)
    m = read_manifest(path)
    if m.get("kind") != "distilled":
        return Substrate.load(path)
    if m.get("format_version") != FORMAT_VERSION:
        raise HermesError(f"{path / 'manifest.json'}: distilled labeler format_version {m.get('format_version')} was "
                          f"written by hermes {m.get('hermes_version')}; this hermes {__version__} reads version "
                          f"{FORMAT_VERSION}", hint="run `hermes distill` again with this version of hermes")
    return load(path, m)


def load(path: Path, manifest: dict[str, Any]) -> DistilledSubstrate:
    for name, checksum in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise HermesError(f"{f}: missing", hint="the distilled substrate is incomplete; run `hermes distill` again")
        if sha256(f) != checksum:
            raise HermesError(f"{f}: checksum does not match the manifest", hint="run `hermes distill` again")
    return DistilledSubstrate(path, manifest)


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
    from hermes.store import connect, info_fields, store_info

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
        t = con.sql("SELECT doc_id, c1, c2, c3 FROM labels ORDER BY rowid").to_arrow_table()
        stack = _teacher_stack(con)
        embeddings = [json.loads(r[0]) for r in con.execute("SELECT embedding FROM substrates").fetchall()]
        encoders = [e.get("encoder") for e in embeddings]
    finally:
        con.close()
    if len(fps) != 1:
        raise HermesError(f"{db}: the store holds labels of {len(fps)} substrates", hint="distill one substrate's store")
    if "static" in encoders:
        raise HermesError(f"{db}: the store was labeled with a static encoder, which is already fast (field "
                          f"'embedding.encoder')", hint="label more data with `hermes label --substrate`; distill "
                                                        "a transformer store")
    teacher = load_for_store(db, substrate) if student == "linear" else None
    info = store_info(db)
    # what counted n_tokens in the teacher's store: its --tokenizer, else its embedding model's tokenizer
    counted_with = info.get("tokenizer") if info.get("tokenizer") not in (None, "the embedding model's") \
        else embeddings[0].get("model")
    rng = random.Random(seed)
    rows = list(range(t.num_rows))
    if len(rows) > sample:
        rows = sorted(rng.sample(rows, sample))
    ids = t.column("doc_id").take(rows).to_pylist()
    codes = np.stack([t.column(c).take(rows).to_numpy() for c in ("c1", "c2", "c3")], axis=1)
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
            classes = [len(set(_key(c, lv) for _, _, c in train)) for lv in LEVELS]
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


# --------------------------------------------------------------------------- the fastText student

def _train_fasttext(train: list, tmp: Path, epochs: int, seed: int, say) -> tuple[dict, dict]:
    # unigrams and 25 epochs: on the dev corpus (256 L1 cells) bigrams or 10 epochs underfit badly
    settings = {"epoch": epochs, "dim": 100, "bucket": 200_000, "wordNgrams": 1, "minCount": 2, "lr": 0.5,
                "seed": seed, "thread": 1}
    used_seed: dict[str, int] = {}
    for level, key in enumerate(LEVEL_KEYS, start=1):
        say(f"distill: training the {key.upper()} classifier on {len(train):,} documents")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            for _, text, c in train:
                f.write(f"__label__{_key(c, level)} {normalise(text)}\n")
            name = f.name
        try:
            _, used_seed[key] = train_supervised(name, tmp / f"{key}.bin", loss="softmax" if level == 1 else "hs",
                                                 **settings)
        finally:
            os.unlink(name)
    counts12: dict[str, dict[str, int]] = {}
    counts123: dict[str, dict[str, int]] = {}
    for _, _, c in train:
        k1, k12, k123 = _key(c, 1), _key(c, 2), _key(c, 3)
        counts12.setdefault(k1, {}).setdefault(k12, 0)
        counts12[k1][k12] += 1
        counts123.setdefault(k12, {}).setdefault(k123, 0)
        counts123[k12][k123] += 1
    # every label a model can emit came from the training data, so each has a fallback child
    fallback = {"l12": {k: max(v, key=v.get) for k, v in counts12.items()},
                "l123": {k: max(v, key=v.get) for k, v in counts123.items()}}
    return {**settings, "seed_used": used_seed}, {"fallback": fallback}


# --------------------------------------------------------------------------- the linear student

# On the dev corpus (teacher 256x256x256, 17k training docs), held-out L1 agreement of ridge
# students: TF-IDF of words over the whole text 0.704; of words in the teacher's window 0.740; of
# the teacher's tokens in its window 0.755 (alpha 0.1 / 0.3 / 1 gave 0.749 / 0.755 / 0.728); with
# the static part 0.771 at alpha 0.3, 0.777 at 0.6; hashed token bigrams in the tokens' own block
# lowered it (0.732). The decision rule of the first stage raised it to 0.786 (on out-of-fold
# predictions: 0.758 -> 0.779). Token pairs as a block of their own, unit length apart from the
# tokens' (PairBlock), raised it to 0.795 with the 64,000 most frequent (L12 0.417 -> 0.445) and
# 0.7985 with 24,000 (the teacher's rule on out-of-fold predictions of all 16.9k training
# documents: 0.767 and 0.766). In 5-fold cross-validation over all 18.8k documents, without the
# decision rule: tokens only 0.760; pairs, 24,000 / 64,000 / 128,000 / all 265k of 2+ documents:
# 0.769 / 0.773 / 0.773 / 0.775; pairs at distance 2 as a third block added nothing (+0.001).
# Neither did a quadratic kernel, static parts of mean-pooled or random-feature token vectors, the
# teacher's embeddings of half-length crops or of the text after the window as more training
# documents, or one-hot c1 targets (all within -0.01..+0.003 at L1). A smaller alpha does help the
# finer stages: with c1 from alpha 0.6, c2 and c3 from alpha 0.1 / 0.2 / 0.3 gave L12 0.409 /
# 0.409 / 0.408 against 0.399 and L123 0.219 / 0.217 / 0.216 against 0.206 (3-fold CV over the
# 16.9k training documents, 11.3k per fit), hence `fine_alpha` 0.15 at the full size: on the
# held-out split, L12 0.445 -> 0.457 and L123 0.244 -> 0.253, L1 unchanged. A context part
# (_context_vectors, from 5,000 training documents) beside the static part raised L1 0.761 ->
# 0.772 and 0.753 -> 0.765, L12 0.404 -> 0.425 and 0.409 -> 0.427, L123 0.209 -> 0.226 and
# 0.215 -> 0.234 (two splits of the 11.9k training documents outside those 5,000, 12.96k per fit,
# one prediction, the teacher's rule); static vectors of the first 32 or 64 tokens of the window,
# or their bag of ids, as parts of their own lowered L1 (0.787 - 0.790 against 0.793 held out).
LINEAR_SETTINGS = {"alpha": 0.6, "min_df": 2, "max_terms": 24_000, "max_pairs": 64_000, "pair_scale": 1.0,
                   "static_scale": 3.0, "max_system": 40_000, "fine_alpha": 0.15, "context_docs": 5_000}
MIN_SYSTEM = 2_000          # the least --max-system: the static and context parts' dimensions and some token ids
# The decision rule of the first learned stage (DecisionRule): fitted on out-of-fold predictions
# of `folds` ridge fits; its penalty is chosen among `lambdas` on a fifth of them held out.
DECISION_SETTINGS = {"folds": 5, "scale": 40.0, "lambdas": [1e-4, 3e-4, 1e-3]}


class TokenBags:
    """What the linear student reads of a text: the teacher's own tokenizer over the teacher's own
    window (the first `window` content tokens, all the encoder sees), as a bag of token ids."""

    def __init__(self, tokenizer_json: str, window: int, vocab: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.no_truncation()
        self.tok.no_padding()
        self.window = window
        self.vocab = vocab
        self.cut = window * 5          # characters tokenized first (about 4 per token in English prose)

    def ids(self, texts: list[str]) -> list[np.ndarray]:
        """The first `window` token ids of each text, exactly as the tokenizer gives them for the
        whole text. Only a head of each text is tokenized: `cut` characters, then four times as
        many, then the whole text, until the window ends before the word the cut split."""
        out: list[np.ndarray | None] = [None] * len(texts)
        todo, cut = list(range(len(texts))), self.cut
        while todo:
            heads = [texts[i][:cut] if cut else texts[i] for i in todo]
            again = []
            with tokenizer_threads():
                encoded = self.tok.encode_batch(heads, add_special_tokens=False)
            for i, head, enc in zip(todo, heads, encoded):
                if len(head) < len(texts[i]):
                    last_word = max(head.rfind(c) for c in " \n\t\r") + 1
                    if len(enc.ids) < self.window or enc.offsets[self.window - 1][1] > last_word:
                        again.append(i)
                        continue
                out[i] = np.asarray(enc.ids[:self.window], dtype=np.int64)
            todo, cut = again, (cut * 4 if cut and cut < 64 * self.window else 0)
        return out

    def counts(self, texts: list[str] | None = None, ids: list[np.ndarray] | None = None):
        """(n, vocab) CSR of sublinear term frequencies, 1 + log(count), of the texts (or of their
        token ids, when already read)."""
        import scipy.sparse as sp

        ids = self.ids(texts) if ids is None else ids
        rows = np.repeat(np.arange(len(ids)), [len(i) for i in ids])
        cols = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        X = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(ids), self.vocab))
        X.sum_duplicates()
        X.data = 1 + np.log(X.data)
        return X


def token_pairs(ids: list[np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each document's adjacent token pairs (a, b) as keys a * vocab + b: (row, key, count), one entry
    per distinct pair of a row, sorted by row then key."""
    lens = np.array([len(i) for i in ids], dtype=np.int64)
    if not len(ids) or lens.sum() < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.concatenate(ids).astype(np.int64)
    doc = np.repeat(np.arange(len(ids), dtype=np.int64), lens)
    same = doc[:-1] == doc[1:]
    rows, keys = doc[:-1][same], flat[:-1][same] * vocab + flat[1:][same]
    span = vocab * vocab
    if len(ids) < np.iinfo(np.int64).max // span:     # one sort of a combined key
        pairs, counts = np.unique(rows * span + keys, return_counts=True)
        return pairs // span, pairs % span, counts
    order = np.lexsort((keys, rows))
    rows, keys = rows[order], keys[order]
    first = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (rows[1:] != rows[:-1])])
    return rows[first], keys[first], np.diff(np.r_[first, len(keys)])


class PairBlock:
    """The linear student's second block of terms: adjacent token pairs (bigrams of the teacher's
    tokens), the `kept` ones (sorted keys) with their idf. A document's pairs weigh 1 + log(count)
    times idf, a pair not kept weighing as one seen in a single training document; the row is
    scaled to unit length over all its pairs, then only the kept columns remain, times `scale`."""

    def __init__(self, kept: np.ndarray, idf: np.ndarray, other_idf: float, vocab: int, scale: float):
        self.kept, self.idf, self.other_idf = kept, idf.astype(np.float32), float(other_idf)
        self.vocab, self.scale = vocab, float(scale)

    @classmethod
    def fit(cls, ids: list[np.ndarray], vocab: int, min_df: int, max_pairs: int, scale: float,
            found: tuple | None = None) -> "PairBlock":
        """`found`: token_pairs(ids, vocab), when already computed."""
        _, keys, _ = token_pairs(ids, vocab) if found is None else found
        uniq, df = np.unique(keys, return_counts=True)
        frequent = np.flatnonzero(df >= min_df)
        top = np.sort(frequent[np.argsort(-df[frequent], kind="stable")[:max_pairs]])
        n = len(ids)
        idf = np.log((1 + n) / (1 + df[top])) + 1                 # smooth idf, as the tokens'
        return cls(uniq[top], idf, np.log((1 + n) / 2) + 1, vocab, scale)

    def matrix(self, ids: list[np.ndarray], found: tuple | None = None):
        """(n, len(kept)) CSR. `found`: token_pairs(ids, vocab), when already computed."""
        import scipy.sparse as sp

        rows, keys, counts = token_pairs(ids, self.vocab) if found is None else found
        shape = (len(ids), len(self.kept))
        if not len(self.kept):
            return sp.csr_matrix(shape, dtype=np.float32)
        at = np.minimum(np.searchsorted(self.kept, keys), len(self.kept) - 1)
        hit = self.kept[at] == keys
        w = (1 + np.log(counts)) * np.where(hit, self.idf[at], self.other_idf)
        norm = np.sqrt(np.bincount(rows, weights=w * w, minlength=len(ids)))
        w = w / np.where(norm > 0, norm, 1)[rows] * self.scale
        indptr = np.r_[0, np.cumsum(np.bincount(rows[hit], minlength=len(ids)))]   # rows come sorted
        return sp.csr_matrix((w[hit].astype(np.float32), at[hit], indptr), shape=shape)


def weigh(counts, idf: np.ndarray):
    """Sublinear term frequencies (CSR) times idf, each row of unit length (empty rows stay zero)."""
    from sklearn.preprocessing import normalize as l2

    return l2(counts.multiply(idf[None, :]).tocsr().astype(np.float32))


def _static_part(X, static: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """The document's static vector: the tf-idf-weighted sum of its tokens' static vectors, of unit
    length; with `context`, the same sum of its tokens' context vectors (_context_vectors) beside
    it. It reaches every token of the vocabulary, seen in training or not."""
    from hermes.vectors import unit_rows

    parts = [static] if context is None else [static, context]
    return np.hstack([unit_rows(np.asarray(X @ v, dtype=np.float32)) for v in parts])


def _context_vectors(encoder, texts: list[str], static: np.ndarray, say) -> tuple[np.ndarray, dict[str, Any]]:
    """A context vector per token id: the mean of the teacher's output vectors of the token (before
    pooling) over `texts`, so what the token comes to mean in the documents, where the static vector
    is the token alone. Ids the texts lack get the least-squares linear map of their static vector
    (hermes.static.context_vectors, as the static encoder does)."""
    say(f"distill: the teacher's context vectors of its tokens, over {len(texts):,} documents")
    sums, counts = encoder.context_sums(texts, static.shape[0])
    out = context_vectors(sums, counts, static)
    return out.astype(np.float32), {"docs": len(texts), "token_ids": int((counts > 0).sum())}


def _teacher_points(teacher, db: Path, train: list, say) -> np.ndarray:
    """The teacher's transformed point h of every training document: from the kept embeddings,
    else embedded again with the teacher's encoder settings."""
    from hermes.pipeline import cached_embeddings

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
    D = _static_part(X, static, context) * s["static_scale"]
    max_terms, max_pairs = _caps(n, D.shape[1], s)
    frequent = np.flatnonzero(df >= s["min_df"])
    keep = np.sort(frequent[np.argsort(-df[frequent], kind="stable")[:max_terms]])
    found = token_pairs(ids, static.shape[0])
    pairs = PairBlock.fit(ids, static.shape[0], s["min_df"], max_pairs, s["pair_scale"], found)
    Xk = sp.hstack([X[:, keep], pairs.matrix(ids, found)], format="csr")
    say(f"distill: ridge regression over {len(keep):,} token ids, {len(pairs.kept):,} token pairs and "
        f"{D.shape[1]} static{' and context' if context is not None else ''} dimensions, {n:,} documents")
    W_terms, W_static, b = _ridge(Xk, D, H, s["alpha"])
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
        W_terms, W_static, b = _ridge(Xk, D, H, s["fine_alpha"])
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


class DecisionRule:
    """A learned stage's code from its input residual r: argmax_j (W_j . r/|r| + b_j). With W = scale
    times the unit codewords and b = 0 it is the teacher's own rule (the cosine argmax); fitted, it
    accounts for the student's errors, which the teacher's rule, made for exact points, does not."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        self.W, self.b = np.asarray(W, dtype=np.float32), np.asarray(b, dtype=np.float32)

    def __call__(self, R: np.ndarray) -> np.ndarray:
        from hermes.vectors import unit_rows

        return np.argmax(unit_rows(R) @ self.W.T + self.b, axis=1)


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
        W, W_static, b = _ridge(Xs[fit], D[fit], H[fit], LINEAR_SETTINGS["alpha"])
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
        W, b = _logistic(R[~val], y[~val], prior, lam)
        scores[lam] = float(np.mean(DecisionRule(W, b)(R[val]) == y[val]))
    lam = max(ds["lambdas"], key=lambda v: (scores[v], -v))
    say(f"distill: decision rule, penalty {lam:g} (held-out fifth: {scores[lam]:.3f} against "
        f"{np.mean(teacher_rule(R[val]) == y[val]):.3f} for the teacher's rule)")
    W, b = _logistic(R, y, prior, lam)
    np.save(tmp / "decision_W.npy", W, allow_pickle=False)
    np.save(tmp / "decision_b.npy", b, allow_pickle=False)
    return {"stage": stage, "folds": k, "scale": ds["scale"], "lambda": lam,
            "out_of_fold_agreement": {"teacher_rule": round(float(np.mean(teacher_rule(R) == y)), 4),
                                      "decision_rule": round(float(np.mean(DecisionRule(W, b)(R) == y)), 4)}}


def _logistic(R: np.ndarray, y: np.ndarray, prior: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression of y on the rows of R, minimising the mean cross-entropy plus
    lam/2 (|W - prior|^2 + |b|^2), by L-BFGS in float64 from W = prior, b = 0."""
    import torch

    Rt, yt = torch.from_numpy(R.astype(np.float64)), torch.from_numpy(y.astype(np.int64))
    W0 = torch.from_numpy(prior.astype(np.float64))
    W = W0.clone().requires_grad_(True)
    b = torch.zeros(len(W0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = (torch.nn.functional.cross_entropy(Rt @ W.T + b, yt)
                 + lam / 2 * (((W - W0) ** 2).sum() + (b ** 2).sum()))
        value.backward()
        return value

    opt.step(loss)
    return W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32)


def _ridge(Xs, D: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression with an intercept of Y on the columns [Xs (sparse), D (dense)]: returns the
    weights of each part and the intercept. Solved exactly, in float64, by a Cholesky factorisation
    in the smaller of the two spaces: features (k x k) when there are fewer features than
    documents, else documents (n x n). That one matrix is the memory bound: it is summed from
    sparse products of row blocks, centred and factorised in place. Dense products run in torch:
    numpy's bundled OpenBLAS crashed (segfault) on products of this size on the development
    machine."""
    import torch

    n, ks = Xs.shape
    k = ks + D.shape[1]
    Xs = Xs.astype(np.float64).tocsr()
    Dt = torch.from_numpy(D.astype(np.float64))
    mu = torch.cat([torch.from_numpy(np.asarray(Xs.mean(axis=0)).ravel()), Dt.mean(0)])
    Yt = torch.from_numpy(Y.astype(np.float64))
    ybar = Yt.mean(0)
    Yc = Yt - ybar
    if k <= n:
        G = torch.zeros((k, k), dtype=torch.float64)
        _add_gram(G[:ks, :ks].numpy(), Xs)                 # a view: G's own memory
        XtD = torch.from_numpy(np.asarray(Xs.T @ Dt.numpy()))
        G[:ks, ks:] = XtD
        G[ks:, :ks] = XtD.T
        G[ks:, ks:] = Dt.T @ Dt
        del XtD
        G.addr_(mu, mu, alpha=-n)
        G.diagonal().add_(alpha)
        W = _cholesky_solve(G, torch.cat([torch.from_numpy(np.asarray(Xs.T @ Yc.numpy())), Dt.T @ Yc]))
    else:
        K = Dt @ Dt.T
        _add_outer(K.numpy(), Xs)
        r = K.mean(1)
        K -= r[:, None]
        K -= (r - r.mean())[None, :]                         # the Gram matrix of the centred rows
        K.diagonal().add_(alpha)
        A = _cholesky_solve(K, Yc)
        # the rows of A sum to zero, so the centred and plain products agree
        W = torch.cat([torch.from_numpy(np.asarray(Xs.T @ A.numpy())), Dt.T @ A])
    b = ybar - mu @ W
    W = W.numpy().astype(np.float32)
    return W[:ks], W[ks:], b.numpy().astype(np.float32)


def _add_gram(G: np.ndarray, A, budget: int = 20_000_000) -> None:
    """G += A^T A for a sparse CSR A, in place (G may be a view), summed over blocks of rows so that
    no sparse product holds more than about `budget` entries."""
    upto = np.cumsum(np.diff(A.indptr).astype(np.int64) ** 2)       # product entries up to each row, at most
    start = 0
    while start < A.shape[0]:
        done = upto[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(upto, done + budget, side="right")))
        P = (A[start:stop].T @ A[start:stop]).tocoo()
        G[P.row, P.col] += P.data                       # a product's entries are distinct
        start = stop


def _add_outer(K: np.ndarray, A, block: int = 1024) -> None:
    """K += A A^T for a sparse CSR A, in place, a block of rows at a time."""
    At = A.T.tocsc()
    for start in range(0, A.shape[0], block):
        K[start:start + block] += (A[start:start + block] @ At).toarray()


def _cholesky_solve(A, B):
    """A X = B for a symmetric positive definite torch matrix A (float64), which it overwrites with
    its Cholesky factor (lower triangle; the upper one is left as garbage), so the solve needs no
    second matrix of A's size. A blocked right-looking factorisation in torch: LAPACK's own potrf
    through scipy (numpy's bundled OpenBLAS) crashed (segfault) at 17k on the development machine
    when threaded, and torch.linalg.cholesky copies."""
    import torch

    n, block = A.shape[0], 1024
    for j in range(0, n, block):
        e = min(j + block, n)
        L, info = torch.linalg.cholesky_ex(A[j:e, j:e])
        if info.item() != 0:
            raise HermesError(f"ridge regression: the system is not positive definite (pivot {j + info.item()})")
        A[j:e, j:e] = L
        if e < n:
            below = torch.linalg.solve_triangular(L.T, A[e:, j:e], upper=True, left=False)
            A[e:, j:e] = below
            A[e:, e:].addmm_(below, below.T, alpha=-1)
    Y = torch.linalg.solve_triangular(A, B, upper=False)             # reads the lower triangle only
    return torch.linalg.solve_triangular(A.T, Y, upper=True)
