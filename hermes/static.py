"""The static encoder: one vector per token id, learned from the teacher on the corpus it labels.

Built once, from a seeded sample of the corpus's documents:

- a token id's *context vector* is the mean of the teacher's last-layer output vectors of that id
  (before pooling) over the sample, each document read up to the teacher's max length: what the
  token comes to mean inside these documents;
- an id the sample never shows gets a least-squares linear map (with an intercept) of its
  *isolated vector*, the teacher's embedding of the token alone, fitted on the ids seen;
- each id is weighted by SIF, `a / (a + p(id))`, `a = 1e-3`, `p` the id's relative frequency over
  the whole texts of the sample; special tokens and `[UNK]` weigh 0;
- a linear map takes the sample's static vectors (of the window the teacher read) onto the
  teacher's own embeddings of those texts, from the same pass (ridge, no intercept, alpha by
  grouped cross-validation; `_align`); the halves, thirds and quarters of the window each text
  was read in, each with the teacher's mean output vector over it, are pairs too (about 9 per
  long text; for a mean-pooled teacher);
- weights and map are folded into the rows, so a document's vector is the mean of its tokens'
  rows over the *whole* text (no window), unit-normalised.

The folder is a sentence-transformers model (a `StaticEmbedding` module, then `Normalize`), so
`SentenceTransformer(folder)` loads it without hermes and gives the same vectors, plus
`hermes_encoder.json`, how it was built and the checksums of its files. hermes encodes with the
`tokenizers` library and sparse products (no torch). Tokenizing would be most of the time, so each
distinct whitespace-separated piece of text is tokenized once and its ids reused (`PieceCache`,
exact for tokenizers that split words at whitespace); the same token ids give `n_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from itertools import chain, count
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa

from hermes.errors import HermesError
from hermes.files import sha256
from hermes.files import replacing
from hermes.vectors import count_rows, gather_runs, unit_rows
from hermes.words import Pieces, as_strings, resplit_rare, string_buffers

MANIFEST = "hermes_encoder.json"
FILES = ("model.safetensors", "tokenizer.json")   # the StaticEmbedding module, saved at the top of the folder
FORMAT = "hermes-static-encoder"
SIF_A = 1e-3                 # SIF's a: an id as frequent as a / (1 - w) of all tokens gets weight w
ENCODE_BATCH = 8192          # texts per bag product
PIECE_CACHE = 1_000_000      # distinct pieces of text whose token ids are kept (about 100 bytes each, ids included)
PIECE_BYTES = 64_000_000     # ... and at most this many bytes of them (long pieces: CJK text, base64)
JOIN_PIECES = 256            # pieces per tokenizer input when new pieces are tokenized
NO_TOKENS = ("no token the static encoder knows (binary, or only unknown and special tokens): it would get no "
             "vector")


@contextmanager
def tokenizer_threads():
    """Let the tokenizer use every core for one call. The encoder and the token counter switch its
    threads off for the whole process (TOKENIZERS_PARALLELISM=false, against deadlocks in forked
    children); the library reads the variable at each call, and a child forked later gets its
    threads off from the library itself."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def is_static_encoder(path: str | Path) -> bool:
    """True for a folder that `build` wrote (a hermes static encoder)."""
    return (Path(path) / MANIFEST).is_file()


def context_vectors(sums: np.ndarray, counts: np.ndarray, isolated: np.ndarray) -> np.ndarray:
    """A vector per token id: the mean of its summed context vectors where `counts` > 0; elsewhere
    the least-squares linear map of its isolated vector (with an intercept) fitted on the ids seen
    (the mean of those seen when they are too few for the map)."""
    seen = counts > 0
    means = sums[seen] / counts[seen, None]
    lift = np.hstack([isolated, np.ones((len(isolated), 1), dtype=isolated.dtype)]).astype(np.float64)
    if seen.sum() > lift.shape[1]:
        out = lift @ np.linalg.lstsq(lift[seen], means, rcond=None)[0]
    else:
        out = np.tile(sums.sum(0) / max(counts.sum(), 1), (len(isolated), 1))
    out[seen] = means
    return out


def sif_weights(counts: np.ndarray, a: float = SIF_A) -> np.ndarray:
    """SIF weights a / (a + p(id)), p the relative frequency of each id among all counted tokens."""
    p = counts / max(float(counts.sum()), 1.0)
    return a / (a + p)


def _checksums(folder: Path) -> dict[str, str]:
    return {name: sha256(folder / name) for name in FILES}


def fingerprint(checksums: dict[str, str]) -> str:
    """One short checksum of an encoder's files (what the substrate records)."""
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()[:16]


def build(teacher, texts: list[str], out: str | Path, recipe: dict[str, Any],
          say: Callable[[str], None] = lambda m: None) -> Path:
    """Build a static encoder from `teacher` (a hermes.embed.Embedder) on `texts` and save it to
    `out` (written under a temporary name, then renamed). `recipe` is recorded as given (teacher,
    sample, seed...) beside the weighting and the checksums."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    teacher.setup()
    tok = Tokenizer.from_str(teacher.fast_tokenizer_json())
    tok.no_truncation()
    tok.no_padding()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    say(f"encoder: the teacher's context vectors of its tokens over {len(texts):,} documents")
    parts = ALIGN_SPAN_PARTS if teacher.mean_pooled() else ()     # a span's target is its mean output
    every = max(len(texts) // 10, teacher.batch_size)

    def progress(done: int, n: int) -> None:          # about ten lines over the pass
        if done == n or done // every > (done - teacher.batch_size) // every:
            say(f"encoder: read {done:,} of {n:,} documents")

    context = teacher.context_sums(texts, vocab, sentences=True, span_parts=parts, progress=progress)
    sums, seen, teacher_vecs = context.sums, context.counts, context.pooled
    say(f"encoder: {int((seen > 0).sum()):,} of {vocab:,} token ids seen; isolated vectors for the rest")
    isolated = teacher.token_vectors()
    vectors = context_vectors(sums, seen, isolated)
    with tokenizer_threads():
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    freq = np.bincount(np.fromiter((i for e in ids for i in e), dtype=np.int64), minlength=vocab)
    weights = sif_weights(freq.astype(np.float64))
    weights[_silent_ids(tok)] = 0.0
    rows = vectors * weights[:, None]
    # the window the teacher read of each sample text, as a bag of ids
    window = [e[:teacher.content_window()] for e in ids]
    rows, alignment = _align(rows, window, teacher_vecs, context.spans)
    if alignment["kind"] == "none":
        say(f"encoder: not aligned to the teacher's embeddings: {alignment['reason']} (raise --encoder-docs)")
    else:
        say(f"encoder: aligned to the teacher's embeddings of the sample (ridge alpha {alignment['alpha']:g}, "
            f"mean cosine {alignment['cosine_before']:.3f} -> {alignment['cosine_after']:.3f})")
    rows = rows.astype(np.float32)

    out = Path(out)
    model = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=torch.from_numpy(rows)), Normalize()],
                                device="cpu")
    with replacing(out) as (tmp,):
        model.save(str(tmp))
        checksums = _checksums(tmp)
        manifest = {"format": FORMAT, "format_version": 1, **recipe,
                    "weighting": {"kind": "sif", "a": SIF_A, "counted_over": "the sample's whole texts"},
                    "alignment": alignment,
                    "vocab": vocab, "dim": int(rows.shape[1]), "token_ids_seen": int((seen > 0).sum()),
                    "files": checksums, "fingerprint": fingerprint(checksums)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


ALIGN_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
ALIGN_FOLDS = 5              # alpha by cross-validation over the sample's texts (`_held_out_alpha`)
ALIGN_SPAN_PARTS = (2, 3, 4)  # each sample text's content also cut into halves, thirds and quarters, as more pairs
ALIGN_MIN_DOCS = 100        # fewer sample documents than this: no map (rows as they are)


def _bags(ids: list[list[int]], vocab: int):
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for e in ids for i in e), dtype=np.int64, count=int(lengths.sum()))
    return count_rows(flat, lengths, vocab)


def _align(rows: np.ndarray, window: list[list[int]], teacher_vecs: np.ndarray, spans=None
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows times the linear map that best takes the sample's static vectors (of the window the
    teacher read) to the teacher's own embeddings of those texts: ridge regression without an
    intercept (so it folds into the rows: the mean of mapped rows is the mapped mean). Alpha is the
    one of ALIGN_ALPHAS whose map places held-out texts nearest the teacher (mean cosine, 5 folds
    by text: a text's spans train with it, never score; written here because scikit-learn's
    searches score every held-out row, spans too). Documents then embed as the teacher
    would place them, not only as its token vectors average. `spans` (hermes.embed.Spans, parts of
    the same texts with the teacher's mean output vector over each, from the same pass) add pairs
    of the same kind: the map learns from 2,000 texts' parts what it would from many more texts."""
    from sklearn.linear_model import Ridge

    S = np.asarray(_bags(window, len(rows)) @ rows)
    keep = np.linalg.norm(S, axis=1) > 0
    S = S[keep] / np.linalg.norm(S[keep], axis=1, keepdims=True)
    T = teacher_vecs[keep].astype(np.float64)
    if len(S) < ALIGN_MIN_DOCS:
        return rows, {"kind": "none", "reason": f"{len(S)} sample documents, fewer than {ALIGN_MIN_DOCS}",
                      "alpha": 0.0, "cosine_before": _cos(S, T), "cosine_after": _cos(S, T)}
    X, Y, groups = S, T, np.flatnonzero(keep)
    n_spans = 0
    if spans is not None and len(spans.lengths):
        P = np.asarray(count_rows(spans.ids, spans.lengths, len(rows)) @ rows)
        has = np.linalg.norm(P, axis=1) > 0
        n_spans = int(has.sum())
        X = np.vstack([S, unit_rows(P[has])])
        Y = np.vstack([T, spans.targets[has].astype(np.float64)])
        groups = np.concatenate([groups, spans.texts[has]])
    alpha = _held_out_alpha(X, Y, groups, len(S))
    W = Ridge(alpha=alpha, fit_intercept=False).fit(X, Y).coef_.T
    return rows @ W, {"kind": "ridge", "alpha": alpha, "docs": int(len(S)), "spans": n_spans,
                      "span_parts": list(ALIGN_SPAN_PARTS) if n_spans else [],
                      "cosine_before": _cos(S, T), "cosine_after": _cos(S @ W, T)}


def _held_out_alpha(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, n_texts: int) -> float:
    """The ridge alpha whose maps, fitted on four fifths of the texts (with their spans), give the
    other fifth's texts (rows < n_texts) the highest mean cosine to their targets."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold

    scores = np.zeros(len(ALIGN_ALPHAS))
    for train, test in GroupKFold(ALIGN_FOLDS).split(X, Y, groups):
        test = test[test < n_texts]
        for i, alpha in enumerate(ALIGN_ALPHAS):
            W = Ridge(alpha=alpha, fit_intercept=False).fit(X[train], Y[train]).coef_.T
            scores[i] += np.sum(unit_rows(X[test] @ W) * Y[test])
    return float(ALIGN_ALPHAS[int(np.argmax(scores))])


def _cos(A: np.ndarray, B: np.ndarray) -> float:
    A = unit_rows(A)
    return round(float(np.mean(np.sum(A * B, axis=1))), 4)


def _silent_ids(tok) -> list[int]:
    """Ids that carry no meaning of the text: the tokenizer's special tokens and its unknown token."""
    silent = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    unk = getattr(tok.model, "unk_token", None)
    if unk is not None and tok.token_to_id(unk) is not None:
        silent.append(tok.token_to_id(unk))
    return sorted(set(silent))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HermesError(f"{folder}: not a readable static encoder ({path.name}: {type(e).__name__})",
                          hint="rebuild it with `hermes fit --encoder static`, or pass the encoder/ folder "
                               "that hermes wrote") from None
    if m.get("format") != FORMAT:
        raise HermesError(f"{path}: not a hermes static encoder manifest (field 'format')",
                          hint="rebuild it with `hermes fit --encoder static`")
    return m


class StaticEncoder:
    """Text -> unit-norm float32 vectors with a saved static encoder; the same interface as
    hermes.embed.Embedder, plus `encode_counted` (vectors, token counts and which texts have a
    known token, from one tokenization)."""

    kind = "static"

    def __init__(self, folder: str | Path, expect: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.expect = expect or {}      # what a substrate recorded of its encoder: teacher, fingerprint
        self._tok: Any = None

    @classmethod
    def of_substrate(cls, embedding: dict[str, Any], folder: str | Path) -> "StaticEncoder":
        """The encoder in a substrate's `folder`, checked on setup against what its manifest's
        `embedding` recorded (teacher and fingerprint)."""
        return cls(folder, expect={"teacher": embedding["teacher"], "fingerprint": embedding["fingerprint"]})

    def setup(self) -> "StaticEncoder":
        if self._tok is not None:
            return self
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        if not self.folder.is_dir():
            raise HermesError(f"{self.folder}: static encoder folder not found",
                              hint="a substrate of a static encoder keeps it in substrate/encoder; copy the whole "
                                   "substrate folder, or refit with `hermes fit --encoder static`")
        m = read_manifest(self.folder)
        want_teacher = self.expect.get("teacher")
        if want_teacher is not None and m.get("teacher") != want_teacher:
            raise HermesError(f"{self.folder}: this static encoder was built from teacher '{m.get('teacher')}', "
                              f"but the substrate says '{want_teacher}' (field 'teacher')",
                              hint="put back the encoder/ folder the substrate was fitted with, or refit")
        try:
            found = _checksums(self.folder)
        except OSError as e:
            raise HermesError(f"{self.folder}: the static encoder is incomplete ({e.strerror}: {e.filename})",
                              hint="rebuild it with `hermes fit --encoder static`, or restore the folder") from None
        if found != m.get("files") or fingerprint(found) != self.expect.get("fingerprint", m.get("fingerprint")):
            raise HermesError(f"{self.folder}: the static encoder is damaged or was replaced (its files' checksums "
                              f"do not match {'the substrate' if self.expect else MANIFEST})",
                              hint="restore the folder the substrate was fitted with, or refit with --encoder static")
        self.manifest_ = m
        weights = load_file(str(self.folder / "model.safetensors"))
        self.rows_ = np.ascontiguousarray(weights["embedding.weight"], dtype=np.float32)
        self.dim_ = int(self.rows_.shape[1])
        self.known_ = np.any(self.rows_ != 0, axis=1)
        tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        self.pieces_ = piece_cache(tok, json.loads((self.folder / "tokenizer.json").read_text()), len(self.rows_),
                                   self.known_)
        self._tok = tok
        return self

    def release(self) -> None:
        """Forget the pieces tokenized so far (the piece tables start again, small): what labeling
        kept to go fast, given back before the store is built."""
        if self._tok is not None and self.pieces_ is not None:
            self.pieces_.release()

    @property
    def model(self) -> str:
        return str(self.folder)

    def settings(self) -> dict[str, Any]:
        """What a substrate records of this encoder (and what its fingerprint covers)."""
        m = self.setup().manifest_
        return {"encoder": "static", "model": f"static encoder of {m['teacher']}", "teacher": m["teacher"],
                "teacher_max_length": m.get("teacher_max_length"), "teacher_dtype": m.get("teacher_dtype"),
                "docs": m.get("docs"), "seed": m.get("seed"), "weighting": m["weighting"],
                "fingerprint": m["fingerprint"], "dtype": "fp32", "max_length": None}

    def token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every text's token ids over the whole text, concatenated, and each text's count: one
        tokenizer call on the whole texts (the reference `encode_counted` is tested against)."""
        self.setup()
        return _ids_of(_encode_batch(self._tok, texts))

    def encode_counted(self, texts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32 unit-norm, token counts (n,), ok (n,) bool) of `texts` (a list of
        str or an Arrow string array): `ok` is False for a text with no known token, whose vector row
        is then zero (it must be rejected, not labeled)."""
        arr = as_strings(texts)
        vecs = np.zeros((len(arr), self.setup().dim_), dtype=np.float32)
        counts = np.zeros(len(arr), dtype=np.int64)
        ok = np.zeros(len(arr), dtype=bool)
        for start in range(0, len(arr), ENCODE_BATCH):      # a slice's bags at a time
            tokens = self._tokenize_slice(arr.slice(start, ENCODE_BATCH))
            stop = start + tokens.n
            vecs[start:stop], ok[start:stop] = self.vectors(tokens)
            counts[start:stop] = tokens.counts
        return vecs, counts, ok

    def tokenize(self, texts) -> "Tokens":
        """The texts' token ids (hermes.static.Tokens), with the split into pieces they were made from
        where the piece cache made one in one go (at most ENCODE_BATCH texts). `vectors(tokens)`
        then gives their vectors: the two halves of `encode_counted`, so that they can run in two
        threads."""
        arr = as_strings(texts)
        if len(arr) <= ENCODE_BATCH:
            return self._tokenize_slice(arr)
        import scipy.sparse as sp

        parts = [self._tokenize_slice(arr.slice(start, ENCODE_BATCH)) for start in range(0, len(arr), ENCODE_BATCH)]
        return Tokens(sp.vstack([t.bags for t in parts], format="csr"), None, np.concatenate([t.counts for t in parts]),
                      np.concatenate([t.known for t in parts]), None)

    def vectors(self, tokens: "Tokens") -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32 unit-norm, ok (n,) bool) of tokenized texts: the mean of each
        text's tokens' rows, normalised; a zero row where a text has no known token (not ok)."""
        v = np.asarray(tokens.bags @ self.rows_, dtype=np.float32)
        norm = np.linalg.norm(v, axis=1)
        ok = (tokens.known > 0) & (norm > 0)
        v[ok] /= norm[ok, None]
        v[~ok] = 0.0
        return v, ok

    def encode(self, texts) -> np.ndarray:
        """Unit-norm vectors; a text with no known token gets a zero row (labeling rejects it)."""
        return self.encode_counted(texts)[0]

    def count(self, texts) -> np.ndarray:
        """Tokens of each whole text (the teacher's tokenizer, no special tokens), as n_tokens counts."""
        return self.tokenize(texts).counts

    def _tokenize_slice(self, texts) -> "Tokens":
        """The tokens of at most ENCODE_BATCH texts (an Arrow string array)."""
        self.setup()
        if self.pieces_ is None:            # a tokenizer the piece cache cannot serve: whole texts
            ids, lengths = self.token_ids(texts.to_pylist())
            bags = count_rows(ids, lengths, len(self.rows_), np.float32)
            return Tokens(bags, None, lengths, bags @ self.known_.astype(np.float32), None)
        return self.pieces_.tokens(texts)


class Tokens(NamedTuple):
    """Texts' token ids, as `StaticEncoder.tokenize` gives them: what the vectors are made of. With
    `piece_ids`, a text's bag is the product of its pieces' occurrences and the pieces' ids, made
    when `bags` is asked for (in the labeling thread, not the tokenizing one)."""
    occurrences: Any            # scipy CSR float32: (n, pieces) each text's count of each piece, or the bags
    piece_ids: Any              # scipy CSR (pieces, vocab) float32: each piece's count of each token id, or None
    counts: np.ndarray          # (n,) tokens of each whole text
    known: np.ndarray           # (n,) of those, tokens the encoder has a vector for
    pieces: "Pieces | None"     # the split into pieces (for the words view), if the piece cache made one

    @property
    def n(self) -> int:
        return len(self.counts)

    @property
    def bags(self):
        """A scipy CSR (n, vocab) float32: each text's count of each token id, in id order (a text's
        vector is summed alike in any batch)."""
        if self.piece_ids is None:
            return self.occurrences
        bags = self.occurrences @ self.piece_ids
        bags.sort_indices()
        return bags

    def take(self, keep: np.ndarray) -> "Tokens":
        """The tokens of the texts where `keep` (a bool mask) is True."""
        rows = np.flatnonzero(keep)
        return Tokens(self.occurrences[rows], self.piece_ids, self.counts[rows], self.known[rows],
                      self.pieces.take(rows) if self.pieces is not None else None)


_WHITESPACE_SPLITS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_FINER_SPLITS = {"Punctuation", "Digits"}
_WORD_KEEPING = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip"}
_CHAR_LOCAL = {"BertNormalizer", "Lowercase", "NFD", "StripAccents"}   # never join a character to the next
ASCII_PUNCTUATION = r"([!-/:-@\[-`{-~])"    # every ASCII character BERT's pre-tokenizer stands alone


def piece_cache(tok, spec: dict[str, Any], vocab: int, known: np.ndarray) -> "PieceCache | None":
    """A PieceCache for a tokenizer (its loaded object and its tokenizer.json) whose tokens of a text
    are the tokens of its whitespace-separated pieces; None for any other (encode whole texts).
    Behind BERT's pre-tokenizer, which also stands every punctuation character alone, a piece's
    tokens are those of its parts around ASCII punctuation, so pieces are cached as parts too."""
    def kinds(part: dict | None, key: str) -> list[str]:
        if not part:
            return []
        if part.get("type") == "Sequence":
            return [k for p in part.get(key, []) for k in kinds(p, key)]
        return [part.get("type")]

    pre, norm = kinds(spec.get("pre_tokenizer"), "pretokenizers"), kinds(spec.get("normalizer"), "normalizers")
    if not set(pre) & _WHITESPACE_SPLITS or not set(pre) <= _WHITESPACE_SPLITS | _FINER_SPLITS \
            or not set(norm) <= _WORD_KEEPING:
        return None
    if any(any(c.isspace() for c in t.get("content", "")) for t in spec.get("added_tokens", [])):
        return None
    norm = spec.get("normalizer") or {}
    drop = any(p.get("type") == "BertNormalizer" and p.get("clean_text", True)
               for p in ([norm] + norm.get("normalizers", [])))
    # a special token with no whitespace in it joins pieces into one tokenizer input
    seps = [(t["content"], t["id"]) for t in spec.get("added_tokens", []) if t.get("special") and t["content"]]
    unk = (spec.get("model") or {}).get("unk_token")
    seps = [s for s in seps if s[0] != unk]
    separator = seps[-1] if seps else None
    parts = None
    # an added token matched after normalising ("<foo>" in "<FOO>") could be cut at its punctuation
    normalized = any(t.get("normalized") for t in spec.get("added_tokens", []))
    if pre == ["BertPreTokenizer"] and set(kinds(spec.get("normalizer"), "normalizers")) <= _CHAR_LOCAL \
            and not normalized:
        # added tokens are matched in the raw text, before the split: a piece that holds one stays whole
        parts = PieceCache(tok, vocab, known, drop_vt_ff=drop, separator=separator)
        parts.added = "|".join(re.escape(t["content"]) for t in spec.get("added_tokens", []) if t.get("content"))
    return PieceCache(tok, vocab, known, drop_vt_ff=drop, separator=separator, parts=parts)


_TABLES = count()


class PieceCache:
    """Each text's token ids as a bag, tokenizing every distinct piece of text only once.

    A piece is a run of the text between ASCII whitespace (space, tab, newline, carriage return).
    For a tokenizer that splits words at whitespace and drops it (BERT's and the `Whitespace`
    pre-tokenizers, behind normalizers that never join two words; `piece_cache` checks), a text's
    tokens are those of its pieces in order, so the bag of ids built from the pieces equals the
    whole text's, and so do the vectors and `n_tokens`. Pieces repeat (Zipf): a batch's distinct
    pieces are looked up here and only the new ones are tokenized, so the tokenizer sees a small
    share of the text. Up to `limit` pieces and PIECE_BYTES bytes of them are kept (then
    the table starts again), so memory stays bounded on any corpus.

    With `parts` (a second table, behind BERT's pre-tokenizer), a new piece is cut around its ASCII
    punctuation and its ids are its parts' ids in order: "word," and "(word" share "word", and a
    long run of punctuated junk (mail headers, uuencoded lines) becomes parts seen before, so the
    tokenizer sees far fewer tokens.

    Written here because the tokenizers library keeps no cache across calls; the splitting runs
    on Arrow's kernels, the pieces are found in numpy (StringSlots, no Python object per piece)
    and the bags are scipy sparse products.
    """

    def __init__(self, tok, vocab: int, known: np.ndarray, drop_vt_ff: bool, separator: tuple[str, int] | None,
                 limit: int = PIECE_CACHE, parts: "PieceCache | None" = None):
        self.tok, self.vocab, self.known, self.limit = tok, vocab, known, limit
        self.drop_vt_ff = drop_vt_ff          # the normaliser deletes \v and \f (control) rather than split there
        self.separator = separator            # (text, id) of a token that joins pieces into one tokenizer input
        self.parts = parts                    # the table of pieces' parts around ASCII punctuation, if any
        self.added = ""                       # (in a parts table) a regex of the added tokens' texts
        self._lock = threading.Lock()
        self.table_id = next(_TABLES)         # with the generation, what the slots of a lookup refer to
        self.generation = -1                  # how often the table has started again: slots name pieces within one
        self._clear()

    def _clear(self) -> None:
        self.generation += 1
        self.index = StringSlots()                         # the pieces, numbered
        self.ids = np.empty(1 << 16, dtype=np.int32)       # the pieces' ids, concatenated
        self.start = np.zeros(1 << 12, dtype=np.int64)     # piece i's ids: ids[start[i]:start[i] + length[i]]
        self.length = np.zeros(1 << 12, dtype=np.int64)
        self.n_known = np.zeros(1 << 12, dtype=np.float64)  # of those, ids the encoder has a vector for
        self.used = 0                                        # ids stored

    def __len__(self) -> int:
        return len(self.index)

    def release(self) -> None:
        """Start this table, and its parts table, again (their memory goes back)."""
        with self._lock:
            self._clear()
        if self.parts is not None:
            self.parts.release()

    def _tokenize(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the order of the result: its i-th piece is pieces[order[i]], their token ids
        concatenated, each one's count). The tokenizer's cost is per input as much as per token, so
        pieces go to it joined into long inputs with the separator token between them; a piece that
        holds the separator's text goes alone."""
        sep = self.separator
        in_order = np.arange(len(pieces))
        if sep is None:
            return in_order, *_ids_of(_encode_batch(self.tok, pieces))
        is_alone = np.fromiter((sep[0] in p for p in pieces), dtype=bool, count=len(pieces))
        joined = [pieces[i] for i in np.flatnonzero(~is_alone)] if is_alone.any() else pieces
        alone = [pieces[i] for i in np.flatnonzero(is_alone)]
        inputs = [f" {sep[0]} ".join(joined[i:i + JOIN_PIECES]) for i in range(0, len(joined), JOIN_PIECES)]
        enc = _encode_batch(self.tok, inputs + alone)
        # a separator after each input too: then every piece ends at one
        flat = np.fromiter(chain.from_iterable(e.ids + [sep[1]] for e in enc[:len(inputs)]), dtype=np.int32,
                           count=sum(len(e) + 1 for e in enc[:len(inputs)]))
        ends = np.flatnonzero(flat == sep[1])
        if len(ends) != len(joined):            # the separator's id came out of a piece after all
            return in_order, *_ids_of(_encode_batch(self.tok, pieces))
        ids, lengths = flat[flat != sep[1]], np.diff(ends, prepend=-1) - 1
        if alone:
            lone_ids, lone_lengths = _ids_of(enc[len(inputs):])
            ids, lengths = np.concatenate([ids, lone_ids]), np.concatenate([lengths, lone_lengths])
        return np.concatenate([np.flatnonzero(~is_alone), np.flatnonzero(is_alone)]), ids.astype(np.int32), \
            lengths.astype(np.int64)

    def _add(self, pieces) -> np.ndarray:
        """Tokenize and store new pieces (an Arrow string array); their positions in the table."""
        order, ids, lengths = self._tokenize(pieces.to_pylist()) if self.parts is None else self._from_parts(pieces)
        first, k = len(self.index), len(pieces)
        if first + k > len(self.start):
            size = max(2 * len(self.start), first + k)
            self.start, self.length, self.n_known = (np.resize(a, size) for a in (self.start, self.length, self.n_known))
        if self.used + len(ids) > len(self.ids):
            self.ids = np.resize(self.ids, max(2 * len(self.ids), self.used + len(ids)))
        self.ids[self.used:self.used + len(ids)] = ids
        self.start[first:first + k] = self.used + np.cumsum(lengths) - lengths
        self.length[first:first + k] = lengths
        self.n_known[first:first + k] = np.bincount(np.repeat(np.arange(k), lengths), weights=self.known[ids],
                                                    minlength=k)
        self.used += len(ids)
        self.index.add(pieces if np.array_equal(order, np.arange(k)) else pieces.take(pa.array(order)))
        where = np.empty(k, dtype=np.int64)
        where[order] = np.arange(first, first + k)
        return where

    def lookup(self, words) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(token ids of `words` (distinct pieces, an Arrow string array) concatenated in order,
        each one's count of ids, and of known ids, each one's slot in the table, the table's
        generation), tokenizing and storing the pieces not in the table yet."""
        with self._lock:
            if len(self.index) + len(words) > self.limit or self.index.n_bytes > PIECE_BYTES:
                self._clear()
            where = self.index.find(words)
            new = np.flatnonzero(where < 0)
            if len(new):
                where[new] = self._add(words.take(pa.array(new)))
            length = self.length[where]
            return gather_runs(self.ids, self.start[where], length), length, self.n_known[where], where, self.generation

    def _from_parts(self, pieces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_tokenize`'s result from the parts table: each piece cut around its ASCII punctuation
        (a piece that holds an added token's text is tokenized whole, as the tokenizer matches it
        before splitting)."""
        import pyarrow.compute as pc

        arr = pieces
        whole = np.zeros(len(pieces), dtype=bool)
        if self.parts.added:
            whole = pc.match_substring_regex(arr, self.parts.added).to_numpy(zero_copy_only=False)
        if whole.any():
            cut = np.flatnonzero(~whole)
            arr = arr.take(pa.array(cut))
        # pieces hold no space: the spaces put around punctuation are the only ones
        lists = pc.split_pattern(pc.replace_substring_regex(arr, ASCII_PUNCTUATION, r" \1 "), " ")
        per_piece = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        distinct = pc.dictionary_encode(pc.list_flatten(lists))
        part_ids, part_length = self.parts.lookup(distinct.dictionary)[:2]
        which = distinct.indices.to_numpy()               # each part in turn, as a distinct part
        length = part_length[which]
        ids = gather_runs(part_ids, (np.cumsum(part_length) - part_length)[which], length)
        lengths = np.bincount(np.repeat(np.arange(len(per_piece)), per_piece), weights=length,
                              minlength=len(per_piece)).astype(np.int64)
        if not whole.any():
            return np.arange(len(pieces)), ids.astype(np.int32), lengths
        order, lone_ids, lone_lengths = self._tokenize(pieces.take(pa.array(np.flatnonzero(whole))).to_pylist())
        return (np.concatenate([cut, np.flatnonzero(whole)[order]]), np.concatenate([ids, lone_ids]).astype(np.int32),
                np.concatenate([lengths, lone_lengths]))

    def tokens(self, texts) -> Tokens:
        """The Tokens of an Arrow string array: each text's occurrences of its distinct pieces, the
        pieces' token ids, counts of tokens and of known tokens, and the split (hermes.words.Pieces:
        the distinct pieces, how often each text holds each, their slots)."""
        import pyarrow.compute as pc

        lists = pc.ascii_split_whitespace(texts)
        if self.drop_vt_ff:
            # the normaliser drops \v and \f (controls) rather than split there, after it has matched
            # special tokens: keep them inside the pieces (the rare texts that hold one split by a
            # slower regex)
            lists = resplit_rare(texts, lists, r"[\v\f]", r"[ \t\n\r]+")
        per_text = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        distinct = pc.dictionary_encode(pc.list_flatten(lists))
        words = distinct.dictionary
        ids, length, n_known, slots, generation = self.lookup(words)
        # texts x distinct pieces (occurrences; a repeated piece is a repeated entry, summed by the
        # products), then pieces x token ids
        occurrences = count_rows(distinct.indices.to_numpy(), per_text, len(words), np.float32)
        counts = np.rint(occurrences @ length.astype(np.float64)).astype(np.int64)
        return Tokens(occurrences, count_rows(ids, length, self.vocab, np.float32), counts, occurrences @ n_known,
                      Pieces(words, occurrences, slots, (self.table_id, generation)))


class StringSlots:
    """Distinct strings numbered 0, 1, 2, ... in the order added, found again from Arrow string arrays
    without a Python object per string: each string's bytes are hashed to 64 bits with numpy, the
    hashes kept in an open-addressing table (linear probing, at most half full, every probe step
    one numpy gather over the strings still looking) and a hit checked byte for byte against the
    string stored. A string whose hash another one took already is kept in a small dict instead.

    Written here because a dict needs a str per lookup and holds the GIL all along (the encoder's
    thread spent most of its Python time there), and no library keeps a hash table across calls
    for Arrow arrays (pyarrow's `index_in` builds its table again on every call). A sorted array
    of the hashes searched by np.searchsorted did the same in twice the time (a binary search
    misses the cache at every step; a probe here is one or two reads)."""

    _MIX = np.random.default_rng(0x5EED).integers(1, 2 ** 63, 4096, dtype=np.uint64) | np.uint64(1)
    _EMPTY = -1

    def __init__(self, places: int = 1 << 12):
        """`places`: the table's size to start with (a power of two; it doubles as it fills)."""
        self._slot = np.full(places, self._EMPTY, dtype=np.int32)    # the table: a string's slot, or empty
        self._key = np.zeros(places, dtype=np.uint64)                 # the hash of the string there
        self._n_keyed = 0                                              # strings in the table
        self._bytes = np.zeros(1 << 20, dtype=np.uint8)  # the strings' bytes, by slot
        self._start = np.zeros(1 << 12, dtype=np.int64)
        self._length = np.zeros(1 << 12, dtype=np.int64)
        self._odd: dict[bytes, int] = {}                 # strings whose hash was taken already
        self.n = 0
        self.n_bytes = 0

    def __len__(self) -> int:
        return self.n

    def find(self, strings: pa.Array) -> np.ndarray:
        """Each string's slot, -1 where it is not here."""
        offsets, data = string_buffers(strings)
        keys = _hash_strings(offsets, data, self._MIX)
        cand = self._probe(keys)
        slots = np.full(len(keys), -1, dtype=np.int64)
        hit = np.flatnonzero(cand >= 0)
        if len(hit):
            cand = cand[hit]
            lengths = np.diff(offsets)[hit]
            same = self._length[cand] == lengths
            check = np.flatnonzero(same & (lengths > 0))
            if len(check):
                mine = gather_runs(data, offsets[:-1][hit[check]], lengths[check])
                stored = gather_runs(self._bytes, self._start[cand[check]], lengths[check])
                ends = np.cumsum(lengths[check])
                differ = np.add.reduceat((mine != stored).astype(np.int64), ends - lengths[check]) > 0
                same[check[differ]] = False
            slots[hit[same]] = cand[same]
        if self._odd:
            return self._find_odd(strings, slots, np.flatnonzero(slots < 0))
        return slots

    def _probe(self, keys: np.ndarray) -> np.ndarray:
        """The slot of the string in the table with each key, -1 where none has it."""
        mask = np.uint64(len(self._slot) - 1)
        out = np.full(len(keys), -1, dtype=np.int64)
        todo, pos = np.arange(len(keys)), (keys & mask).astype(np.int64)
        while len(todo):
            slot = self._slot[pos]
            taken = slot != self._EMPTY
            found = taken & (self._key[pos] == keys[todo])
            out[todo[found]] = slot[found]
            on = taken & ~found                   # another key sits here: look at the next place
            todo, pos = todo[on], (pos[on] + 1) & int(mask)
        return out

    def _insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Put distinct keys, none in the table yet, with their slots."""
        if 2 * (self._n_keyed + len(keys)) > len(self._slot):
            kept = np.flatnonzero(self._slot != self._EMPTY)
            old_keys, old_slots = self._key[kept], self._slot[kept]
            size = len(self._slot)
            while 2 * (self._n_keyed + len(keys)) > size:
                size *= 2
            self._slot = np.full(size, self._EMPTY, dtype=np.int32)
            self._key = np.zeros(size, dtype=np.uint64)
            self._n_keyed = 0
            self._insert(old_keys, old_slots)
        mask = len(self._slot) - 1
        todo, pos = np.arange(len(keys)), (keys & np.uint64(mask)).astype(np.int64)
        while len(todo):
            free = self._slot[pos] == self._EMPTY
            claim = -2 - todo[free]               # each claimant writes its own mark; one wins a place
            self._slot[pos[free]] = claim
            won = np.zeros(len(todo), dtype=bool)
            won[free] = self._slot[pos[free]] == claim
            self._slot[pos[won]] = slots[todo[won]]
            self._key[pos[won]] = keys[todo[won]]
            todo, pos = todo[~won], (pos[~won] + 1) & mask
        self._n_keyed += len(keys)

    def _find_odd(self, strings: pa.Array, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if len(rows):
            found = [self._odd.get(s, -1) for s in strings.take(pa.array(rows)).cast(pa.binary()).to_pylist()]
            slots[rows] = found
        return slots

    def add(self, strings: pa.Array) -> np.ndarray:
        """Slots for `strings` (distinct, none here yet), numbered on from the last, in order."""
        offsets, data = string_buffers(strings)
        k, first = len(strings), self.n
        slots = np.arange(first, first + k)
        lengths = np.diff(offsets)
        total = int(lengths.sum())
        if first + k > len(self._start):
            size = max(2 * len(self._start), first + k)
            self._start, self._length = np.resize(self._start, size), np.resize(self._length, size)
        if self.n_bytes + total > len(self._bytes):
            self._bytes = np.resize(self._bytes, max(2 * len(self._bytes), self.n_bytes + total))
        self._bytes[self.n_bytes:self.n_bytes + total] = data[offsets[0]:offsets[-1]]
        self._start[first:first + k] = self.n_bytes + offsets[:-1] - offsets[0]
        self._length[first:first + k] = lengths
        self.n_bytes += total
        self.n += k
        keys = _hash_strings(offsets, data, self._MIX)
        taken = np.ones(k, dtype=bool)                # a hash met twice (all but its first), or here already
        taken[np.unique(keys, return_index=True)[1]] = False
        taken |= self._probe(keys) >= 0
        if taken.any():
            odd = np.flatnonzero(taken)
            self._odd.update(zip(strings.take(pa.array(odd)).cast(pa.binary()).to_pylist(), slots[odd].tolist()))
        keep = np.flatnonzero(~taken)
        self._insert(keys[keep], slots[keep])
        return slots


def _hash_strings(offsets: np.ndarray, data: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each string's bytes (data[offsets[i]:offsets[i + 1]]): the sum of each byte
    times a random odd number for its position, then the length folded in and splitmix64's finaliser."""
    lengths = np.diff(offsets)
    first = offsets[0]
    b = data[first:offsets[-1]].astype(np.uint64) + np.uint64(1)
    pos = np.arange(len(b), dtype=np.int64) - np.repeat(offsets[:-1] - first, lengths)
    terms = b * (mix[pos & 4095] + (pos >> 12).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    h = np.zeros(len(lengths), dtype=np.uint64)
    full = np.flatnonzero(lengths > 0)
    if len(full):
        h[full] = np.add.reduceat(terms, (offsets[:-1] - first)[full])
    h ^= lengths.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _encode_batch(tok, texts: list[str]) -> list:
    """The tokenizer's encodings of `texts` (no special tokens added), on every core."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    with tokenizer_threads():
        return encode(texts, add_special_tokens=False)


def _ids_of(encodings: list) -> tuple[np.ndarray, np.ndarray]:
    """The encodings' token ids, concatenated, and each one's count."""
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    return np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum())), lengths


class Reservoir:
    """A seeded uniform sample of n texts from a stream of batches (lists of str, or Arrow string
    arrays: only the texts that enter the sample become Python strings), read once (reservoir
    sampling, Algorithm R); all of them when there are n or fewer. `seen`: the texts offered."""

    def __init__(self, n: int, seed: int):
        self.n, self._rng = n, np.random.default_rng(seed)
        self.texts: list[str] = []
        self.seen = 0

    def add(self, texts) -> None:
        take = max(0, min(len(texts), self.n - len(self.texts)))
        self.texts.extend(texts[:take] if isinstance(texts, list) else texts.slice(0, take).to_pylist())
        rest = len(texts) - take
        if rest:
            positions = np.arange(self.seen + take, self.seen + len(texts))
            slots = self._rng.integers(0, positions + 1)
            for k in np.flatnonzero(slots < self.n):
                text = texts[take + k]
                self.texts[slots[k]] = text if isinstance(text, str) else text.as_py()
        self.seen += len(texts)
