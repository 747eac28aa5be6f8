"""A batch of texts as its whitespace-separated words, each distinct word stored once.

The quality heuristic and the term counts both look at words, and words repeat (Zipf): a batch of
documents holds about ten times fewer distinct words than words. `Words.of` splits the texts
once (at Unicode whitespace, as Python's `str.split()`), numbers the distinct words, and keeps a
sparse (texts x distinct words) matrix of occurrences. A per-word quantity is then computed on the
distinct words alone and summed per text by one sparse product (`per_text`). Anything that never
spans whitespace (letters, symbols, runs of letters) sums exactly this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hermes.vectors import count_rows


def as_strings(texts) -> pa.Array:
    """Texts as one Arrow string array: a list of str, an Arrow array or a chunked column."""
    if isinstance(texts, pa.ChunkedArray):
        return texts.combine_chunks()
    return texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())


@dataclass
class Words:
    texts: pa.Array          # the batch, as one string array
    distinct: pa.Array       # each distinct word once (the empty string too, where whitespace starts or ends a text)
    occurrences: object      # scipy CSR (len(texts), len(distinct)): how often each text holds each word

    @classmethod
    def of(cls, texts) -> "Words":
        arr = as_strings(texts)
        lists = pc.utf8_split_whitespace(arr)
        per_text = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        coded = pc.dictionary_encode(pc.list_flatten(lists))
        occurrences = count_rows(coded.indices.to_numpy(), per_text, len(coded.dictionary))
        return cls(arr, coded.dictionary, occurrences)

    @classmethod
    def of_pieces(cls, texts: pa.Array, pieces: pa.Array, occurrences) -> "Words":
        """The words of `texts` from a split at ASCII whitespace done already: `pieces` its distinct
        pieces, `occurrences` (texts x pieces) how often each text holds each. A piece is cut at the
        rest of the whitespace, so each text holds the same words as `of` finds (and at most some
        more empty strings, which count as no word)."""
        lists = pc.utf8_split_whitespace(pieces)
        per_piece = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        coded = pc.dictionary_encode(pc.list_flatten(lists))
        in_piece = count_rows(coded.indices.to_numpy(), per_piece, len(coded.dictionary))
        return cls(texts, coded.dictionary, (occurrences @ in_piece).tocsr())

    def take(self, keep: np.ndarray) -> "Words":
        """The words of the texts where `keep` (a bool mask) is True."""
        return Words(self.texts.filter(pa.array(keep)), self.distinct, self.occurrences[np.flatnonzero(keep)])

    def per_text(self, values: np.ndarray) -> np.ndarray:
        """Sum over each text's words of a per-distinct-word value (an array, or columns of one)."""
        return np.asarray(self.occurrences @ np.asarray(values, dtype=np.float64))

    def is_word(self) -> np.ndarray:
        """1.0 for every distinct word but the empty string."""
        return pc.greater(pc.utf8_length(self.distinct), 0).to_numpy(zero_copy_only=False).astype(np.float64)
