"""Quality scores: one per document, in the `quality` column.

Sources (config key `quality`):
- `none`: quality stays NULL.
- `heuristic`: a built-in score in [0, 1] from C4/Gopher-style signals (below). Cheap: no model.
- `field`: a numeric field of each record (`quality_field`, a dotted path); a record whose field is
  missing or not a number is rejected with the reason.

`heuristic_scores` computes it for a batch with Arrow's compute kernels (RE2, C++), the word
signals once per distinct word (`hermes.words`), so that it keeps pace with a fast encoder; `heuristic_score` is the same score for one text in plain Python,
the reference it is tested against. They agree on every text but where lowercasing differs:
Python lowercases `İ` to two characters (`i̇`), Arrow to `i` (a stop word).

The heuristic is the mean of eight graded signals, each in [0, 1], so that scores rarely tie
and within-cell quantiles are meaningful:

| signal | 1.0 when | falls to 0.0 |
|---|---|---|
| length | >= 1,000 words (log scale) | 1 word |
| mean word length | 3 to 10 characters | 3 characters further out |
| symbols (#, ..., bullets) per word | 0 | 0.2 and above |
| words with a letter | >= 80% of words | 50% |
| stop-word density (the, of, and, ...) | >= 20% of words | 0% |
| letters among characters | >= 75% | 40% |
| repeated lines | 0% of lines | 30% and above |
| lines ending in an ellipsis | 0% of lines | 30% and above |
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hermes.words import PieceSums, Words, resplit_rare, string_buffers

SOURCES = ("none", "heuristic", "field")

STOP_WORDS = frozenset("""the be to of and a in that have i it for not on with he as you do at this but his by
from they we say her she or an will my one all would there their what so up out if about who get which go me
is are was were been has had its our your them these those than then""".split())
_WORD = re.compile(r"\S+")
_SYMBOL = re.compile(r"#|\.\.\.|…|•")


def _clip(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def heuristic_score(text: str) -> float:
    words = _WORD.findall(text)
    n = len(words)
    if n == 0:
        return 0.0
    mean_len = sum(len(w) for w in words) / n
    s_len = _clip(math.log(n) / math.log(1000))
    s_wlen = 1.0 if 3 <= mean_len <= 10 else _clip(1 - min(abs(mean_len - 3), abs(mean_len - 10)) / 3)
    s_sym = _clip(1 - len(_SYMBOL.findall(text)) / n / 0.2)
    alpha_words = sum(1 for w in words if any(c.isalpha() for c in w)) / n
    s_alpha_words = _clip((alpha_words - 0.5) / 0.3)
    stop = sum(1 for w in words if w.lower().strip(".,;:!?\"'()") in STOP_WORDS) / n
    s_stop = _clip(stop / 0.2)
    chars = [c for c in text if not c.isspace()]
    letters = sum(1 for c in chars if c.isalpha()) / max(1, len(chars))
    s_letters = _clip((letters - 0.4) / 0.35)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    n_lines = max(1, len(lines))
    s_dup = _clip(1 - (len(lines) - len(set(lines))) / n_lines / 0.3)
    s_ellipsis = _clip(1 - sum(1 for ln in lines if ln.endswith(("...", "…"))) / n_lines / 0.3)
    return (s_len + s_wlen + s_sym + s_alpha_words + s_stop + s_letters + s_dup + s_ellipsis) / 8


# What Python's str.splitlines() counts as line breaks, in RE2.
_LINE_BREAK = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\x{2028}\x{2029}]"
_OTHER_BREAK = r"[\x0b\x0c\x1c\x1d\x1e\x85\x{2028}\x{2029}]|\r[^\n]|\r$"    # any break but \n and \r\n
_STOP_SET = pa.array(sorted(STOP_WORDS), pa.string())


def _split_lines(arr: pa.Array) -> pa.ListArray:
    """Each text's lines, split as Python's str.splitlines() splits them, except that a line ends
    with the \r of its \r\n (the caller trims the lines). The texts that hold any other line break
    (rare) split by the slower regex."""
    return resplit_rare(arr, pc.split_pattern(arr, "\n"), _OTHER_BREAK, _LINE_BREAK)


def _per_text(parents: np.ndarray, n: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(parents, weights=weights, minlength=n).astype(np.float64)


def _pieces(lists: pa.ListArray) -> tuple[pa.Array, np.ndarray]:
    """The non-empty pieces of split texts, flattened, and each one's text index (a text that
    starts or ends with a separator gives an empty piece there)."""
    flat, parents = pc.list_flatten(lists), pc.list_parent_indices(lists)
    keep = pc.greater(pc.utf8_length(flat), 0)
    return flat.filter(keep), parents.filter(keep).to_numpy()


def word_counts(distinct: pa.Array) -> np.ndarray:
    """The heuristic's per-word counts of each word: (is a word (not empty), characters, has a
    letter, is a stop word, letters, symbols), an (n, 6) int64 array. Each is summed per text."""
    stripped = pc.utf8_trim(pc.utf8_lower(distinct), characters=".,;:!?\"'()")
    length = pc.utf8_length(distinct).to_numpy(zero_copy_only=False)
    letters = _letters(distinct)
    return np.stack([
        length > 0,
        length,
        letters > 0,
        pc.is_in(stripped, value_set=_STOP_SET).to_numpy(zero_copy_only=False),
        letters,
        pc.count_substring_regex(distinct, r"#|\.\.\.|…|•").to_numpy(),    # never spans whitespace
    ], axis=1).astype(np.int64)


_ASCII_LETTER = np.zeros(256, dtype=np.int64)
_ASCII_LETTER[ord("A"):ord("Z") + 1] = _ASCII_LETTER[ord("a"):ord("z") + 1] = 1


def _letters(arr: pa.Array) -> np.ndarray:
    """The letters (Unicode category L) of each string of an Arrow string array (no nulls): the
    ASCII strings' by a byte table over the array's data buffer, the others' by RE2 (a regex
    replace is the slowest kernel of the heuristic, and most words are ASCII)."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    offsets, data = string_buffers(arr)
    running = np.concatenate([[0], np.cumsum(_ASCII_LETTER[data[offsets[0]:offsets[-1]]])])
    out = running[offsets[1:] - offsets[0]] - running[offsets[:-1] - offsets[0]]
    other = np.flatnonzero(~pc.string_is_ascii(arr).to_numpy(zero_copy_only=False))
    if len(other):
        out[other] = pc.utf8_length(pc.replace_substring_regex(arr.take(pa.array(other)), r"\PL+", "")).to_numpy()
    return out


def heuristic_scores(texts, words: Words | None = None, sums: PieceSums | None = None) -> np.ndarray:
    """`heuristic_score` of each text (a list of str or an Arrow string array), vectorised. The
    word signals are computed once per distinct word and summed per text (`words`, if the caller
    has split the texts already); with `sums` (a PieceSums of `word_counts`, kept by the caller
    across batches), once per distinct piece of text the encoder has seen."""
    import scipy.sparse as sp

    words = words if words is not None else Words.of(texts)
    arr = words.texts
    size = len(arr)
    if size == 0:
        return np.zeros(0, dtype=np.float64)
    per_text = sums(words) if sums is not None else words.per_text(word_counts(words.distinct))
    n, nonspace, alpha, stop, letters, symbols = np.asarray(per_text, dtype=np.float64).T
    has = n > 0
    safe_n = np.where(has, n, 1)
    with np.errstate(divide="ignore"):
        s_len = np.clip(np.log(safe_n) / math.log(1000), 0, 1)
    mean_len = nonspace / safe_n
    s_wlen = np.where((mean_len >= 3) & (mean_len <= 10), 1.0,
                      np.clip(1 - np.minimum(np.abs(mean_len - 3), np.abs(mean_len - 10)) / 3, 0, 1))
    s_sym = np.clip(1 - symbols / safe_n / 0.2, 0, 1)
    s_alpha_words = np.clip((alpha / safe_n - 0.5) / 0.3, 0, 1)
    s_stop = np.clip(stop / safe_n / 0.2, 0, 1)
    s_letters = np.clip((letters / np.maximum(1, nonspace) - 0.4) / 0.35, 0, 1)
    lines, lp = _pieces(_split_lines(pc.utf8_trim_whitespace(arr)))
    lines = pc.utf8_trim_whitespace(lines)
    keep = pc.greater(pc.utf8_length(lines), 0)
    lines, lp = lines.filter(keep), lp[keep.to_numpy(zero_copy_only=False)]
    n_lines = _per_text(lp, size)
    codes = pc.dictionary_encode(lines)
    # distinct lines per text: the (text, line) pairs as a sparse matrix, its duplicates summed
    pairs = sp.csr_matrix((np.ones(len(lp), dtype=np.int32), (lp, codes.indices.to_numpy())),
                          shape=(size, max(len(codes.dictionary), 1)))
    pairs.sum_duplicates()
    n_distinct = np.diff(pairs.indptr).astype(np.float64)
    safe_lines = np.maximum(1, n_lines)
    s_dup = np.clip(1 - (n_lines - n_distinct) / safe_lines / 0.3, 0, 1)
    ellipsis = _per_text(lp, size, pc.match_substring_regex(lines, r"(\.\.\.|…)$").to_numpy(zero_copy_only=False)
                         .astype(np.float64))
    s_ellipsis = np.clip(1 - ellipsis / safe_lines / 0.3, 0, 1)
    score = (s_len + s_wlen + s_sym + s_alpha_words + s_stop + s_letters + s_dup + s_ellipsis) / 8
    return np.where(has, score, 0.0)
