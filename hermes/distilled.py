"""The distilled labeler at labeling time: a substrate of kind `distilled` that gives a store's
codes from text alone, with no embedding model (hermes.distill trains it; its docstring describes
the two students).

A `linear` student reads the teacher's own tokens of the teacher's window (TokenBags), weighs them
(weigh), and predicts the document's point in the teacher's transformed space; the teacher's
codebooks quantize it, the first learned stage by a fitted DecisionRule. A `fasttext` student
decodes c1, then the L12 and L123 cells under it. `load_labeler` opens either kind of substrate.
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hermes._version import __version__
from hermes.cellkeys import LEVELS, view_suffix
from hermes.errors import HermesError
from hermes.fasttext_quality import _fasttext, normalise
from hermes.files import sha256
from hermes.static import tokenizer_threads
from hermes.substrate import FORMAT_VERSION, Substrate, read_manifest



LEVEL_KEYS = tuple(view_suffix(level) for level in LEVELS)     # the fasttext student's models
TOP_K = 20
STUDENTS = ("linear", "fasttext")


def level_key(codes, level: int) -> str:
    return ".".join(str(int(c)) for c in codes[:level])


class DistilledSubstrate:
    kind = "distilled"

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.recorded = manifest            # its manifest.json, as read
        self.student = manifest.get("student", "fasttext")
        self.fingerprint = manifest["fingerprint"]
        self.fit_sample_size = manifest["data"]["train_docs"]
        self.embedding = None
        self.training = {"agreement": manifest["agreement"]}
        self._models: dict[str, Any] = {}

    @property
    def sizes(self) -> list[int]:
        return self.recorded["classes"]

    @property
    def n_tokens_tokenizer(self) -> str | None:
        """What counted n_tokens in the teacher's store (a tokenizer folder, or the teacher's model),
        so that labeling counts the same way; None in a folder of an earlier hermes."""
        value = self.recorded.get("n_tokens_tokenizer")
        if value is None or Path(value).is_dir():
            return value
        from hermes.embed import resolve_model

        return str(resolve_model(value))

    @property
    def stages(self) -> list[dict[str, Any]]:
        """The teacher's stage stack (with a fixed stage's class names)."""
        return self.recorded.get("stages") or [{"kind": "learned"} for _ in LEVEL_KEYS]

    @property
    def fixed(self) -> list[int]:
        """The fixed stages whose codes labeling must supply (the linear student takes them from the
        document, as the teacher did; the fastText student predicts every code)."""
        from hermes.stack import fixed_indices

        return fixed_indices(self.stages) if self.student == "linear" else []

    def setup(self) -> "DistilledSubstrate":
        if self._models:
            return self
        if self.student == "linear":
            from hermes.rvq import ResidualQuantizer

            if "tokenizer.json" not in self.recorded["files"]:
                raise HermesError(f"{self.path}: a linear student of an earlier hermes (words, not the "
                                  "teacher's tokens)", hint="run `hermes distill` again")
            q = ResidualQuantizer(stages=len(LEVEL_KEYS),
                                  fixed={i: len(self.stages[i]["classes"]) for i in self.fixed})
            q.codebooks_ = [np.load(self.path / f"codebook_{i + 1}.npy", allow_pickle=False)
                            for i in range(len(LEVEL_KEYS))]
            names = ["idf", "W", "static", "W_static", "b"]
            if "W_fine.npy" in self.recorded["files"]:           # older students: one prediction for every stage
                names += ["W_fine", "W_static_fine", "b_fine", "W_pairs_fine"]
            if "context.npy" in self.recorded["files"]:          # older students: no context part
                names += ["context"]
            arrays = {name: np.load(self.path / f"{name}.npy", allow_pickle=False).astype(np.float32)
                      for name in names}
            st = self.recorded["settings"]
            bags = TokenBags((self.path / "tokenizer.json").read_text(encoding="utf-8"), st["window"], st["vocab"])
            if "pairs.npy" in self.recorded["files"]:            # older students read tokens only
                arrays["pairs"] = PairBlock(np.load(self.path / "pairs.npy", allow_pickle=False),
                                            np.load(self.path / "pair_idf.npy", allow_pickle=False),
                                            st["pair_other_idf"], st["vocab"], st["pair_scale"])
                arrays["W_pairs"] = np.load(self.path / "W_pairs.npy", allow_pickle=False).astype(np.float32)
            choose = {}
            if "decision_W.npy" in self.recorded["files"]:
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
        fb = self.recorded["fallback"]
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
        S = static_part(X, m["static"], m.get("context"))
        XP = m["pairs"].matrix(ids) if "pairs" in m else None

        def predict(suffix: str = "") -> np.ndarray:
            h = np.asarray(X @ m[f"W{suffix}"]) + S @ m[f"W_static{suffix}"] + m[f"b{suffix}"]
            if XP is not None:
                h += np.asarray(XP @ m[f"W_pairs{suffix}"])
            return unit_rows(h.astype(np.float32))

        codes = m["quantizer"].encode(predict(), fixed=fixed, choose=m["choose"])
        if "W_fine" in m:      # the stages after the first learned one quantize the finer prediction
            first = self.recorded["settings"]["fine"]["after_stage"]
            keep = codes[:, first].astype(np.int64)
            codes = m["quantizer"].encode(predict("_fine"), fixed=fixed, choose={first: lambda R: keep})
        return codes

    def manifest(self) -> dict[str, Any]:
        """In the shape the store's substrates table reads."""
        m = self.recorded
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


def static_part(X, static: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """The document's static vector: the tf-idf-weighted sum of its tokens' static vectors, of unit
    length; with `context`, the same sum of its tokens' context vectors (_context_vectors) beside
    it. It reaches every token of the vocabulary, seen in training or not."""
    from hermes.vectors import unit_rows

    parts = [static] if context is None else [static, context]
    return np.hstack([unit_rows(np.asarray(X @ v, dtype=np.float32)) for v in parts])


class DecisionRule:
    """A learned stage's code from its input residual r: argmax_j (W_j . r/|r| + b_j). With W = scale
    times the unit codewords and b = 0 it is the teacher's own rule (the cosine argmax); fitted, it
    accounts for the student's errors, which the teacher's rule, made for exact points, does not."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        self.W, self.b = np.asarray(W, dtype=np.float32), np.asarray(b, dtype=np.float32)

    def __call__(self, R: np.ndarray) -> np.ndarray:
        from hermes.vectors import unit_rows

        return np.argmax(unit_rows(R) @ self.W.T + self.b, axis=1)
