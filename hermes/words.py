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

from hermes.vectors import count_rows, gather_runs


def as_strings(texts) -> pa.Array:
    """Texts as one Arrow string array: a list of str, an Arrow array or a chunked column."""
    if isinstance(texts, pa.ChunkedArray):
        return texts.combine_chunks()
    return texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())


def string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n + 1, int64, into data), data (uint8)) of an Arrow string or binary array, without
    a copy of the data (offsets start where the array's slice does)."""
    wide = pa.types.is_large_string(strings.type) or pa.types.is_large_binary(strings.type)
    _, off, data = strings.buffers()[:3]
    offsets = np.frombuffer(off, dtype=np.int64 if wide else np.int32)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    return offsets.astype(np.int64), data


def resplit_rare(texts: pa.Array, lists: pa.ListArray, rare: str, pattern: str) -> pa.ListArray:
    """`lists` (a fast split of `texts`, one list per text) with the rows of the texts that match
    the regex `rare` split again at the regex `pattern`: a rare text takes the slow split alone,
    not its whole batch."""
    odd = np.flatnonzero(pc.match_substring_regex(texts, rare).to_numpy(zero_copy_only=False))
    if not len(odd):
        return lists
    slow = pc.split_pattern_regex(texts.take(pa.array(odd)), pattern).cast(lists.type)
    if len(odd) > 64:           # many: one gather
        rows = np.arange(len(texts))
        rows[odd] = len(texts) + np.arange(len(odd))
        return pa.concat_arrays([lists, slow]).take(pa.array(rows))
    # few (the usual case): the runs between them copied whole, which is cheaper than a gather
    parts, start = [], 0
    for k, row in enumerate(odd.tolist()):
        parts += [lists.slice(start, row - start), slow.slice(k, 1)]
        start = row + 1
    return pa.concat_arrays(parts + [lists.slice(start)])


@dataclass
class Pieces:
    """The split at ASCII whitespace that a batch's words were made from, with each distinct piece's
    slot in the encoder's piece table (hermes.static.PieceCache): while the table keeps its
    generation, a slot names the same piece in every batch, so a per-piece result can be kept."""
    distinct: pa.Array       # each distinct piece once
    occurrences: object      # scipy CSR (texts, pieces): how often each text holds each piece
    slots: np.ndarray        # each distinct piece's slot in the table
    table: tuple             # (the table's id, its generation)

    def take(self, rows: np.ndarray) -> "Pieces":
        return Pieces(self.distinct, self.occurrences[rows], self.slots, self.table)


@dataclass
class Words:
    texts: pa.Array          # the batch, as one string array
    distinct: pa.Array       # each distinct word once (the empty string too, where whitespace starts or ends a text)
    occurrences: object      # scipy CSR (len(texts), len(distinct)): how often each text holds each word
    pieces: Pieces | None = None    # the split into pieces it was made from, if the encoder made one

    @classmethod
    def of(cls, texts) -> "Words":
        arr = as_strings(texts)
        lists = pc.utf8_split_whitespace(arr)
        per_text = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        coded = pc.dictionary_encode(pc.list_flatten(lists))
        occurrences = count_rows(coded.indices.to_numpy(), per_text, len(coded.dictionary))
        return cls(arr, coded.dictionary, occurrences)

    @classmethod
    def of_split(cls, texts, pieces: Pieces | None) -> "Words":
        """The words of `texts`, from the static encoder's split into pieces (`Tokens.pieces`) where
        it made one."""
        arr = as_strings(texts)
        return cls.of(arr) if pieces is None else cls.of_pieces(arr, pieces)

    @classmethod
    def of_pieces(cls, texts: pa.Array, pieces: Pieces) -> "Words":
        """The words of `texts` from a split at ASCII whitespace done already (`pieces`). A piece is
        cut at the rest of the whitespace, so each text holds the same words as `of` finds (and at
        most some more empty strings, which count as no word)."""
        lists = pc.utf8_split_whitespace(pieces.distinct)
        flat = pc.list_flatten(lists)
        if len(flat) == len(pieces.distinct) and pc.all(pc.equal(flat, pieces.distinct), min_count=0).as_py():
            return cls(texts, pieces.distinct, pieces.occurrences, pieces)    # no piece holds other whitespace
        per_piece = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        coded = pc.dictionary_encode(flat)
        in_piece = count_rows(coded.indices.to_numpy(), per_piece, len(coded.dictionary))
        return cls(texts, coded.dictionary, (pieces.occurrences @ in_piece).tocsr(), pieces)

    def take(self, keep: np.ndarray) -> "Words":
        """The words of the texts where `keep` (a bool mask) is True."""
        rows = np.flatnonzero(keep)
        return Words(self.texts.filter(pa.array(keep)), self.distinct, self.occurrences[rows],
                     self.pieces.take(rows) if self.pieces is not None else None)

    def per_text(self, values: np.ndarray) -> np.ndarray:
        """Sum over each text's words of a per-distinct-word value (an array, or columns of one)."""
        return np.asarray(self.occurrences @ np.asarray(values, dtype=np.float64))


class PieceSums:
    """Per-text sums of per-word counts, each distinct piece of text's computed once while the
    encoder's piece table keeps its generation (words repeat across batches as they do within
    one). `counts(distinct words)` gives an (n, width) array of integers; a text's sum over its
    words equals the sum over its pieces of each piece's sum over its words. Batches the encoder
    did not split (no `Words.pieces`) are summed word by word, as `Words.per_text` does.
    Each piece's sums are kept as a run of `width` int32 (a piece is shorter than 2**31 characters)."""

    def __init__(self, counts, width: int):
        self.counts, self.width = counts, width
        self._runs = PieceRuns(np.int32)

    def __call__(self, words: Words) -> np.ndarray:
        """(len(words.texts), width) float64: each text's sums."""
        pieces = words.pieces
        if pieces is None:
            return words.per_text(self.counts(words.distinct))
        values, _ = self._runs.runs(pieces, self._sums)
        return np.asarray(pieces.occurrences @ values.reshape(-1, self.width).astype(np.float64))

    def _sums(self, new: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        split = Words.of(new)                   # new pieces as texts of words
        sums = np.rint(split.per_text(self.counts(split.distinct))).astype(np.int32)
        return sums.reshape(-1), np.full(len(new), self.width, dtype=np.int64)


class PieceRuns:
    """Per distinct piece of text, a run of integers (its counted words' term ids, say), each piece's
    computed once while the encoder's piece table keeps its generation (PieceSums keeps sums so).
    `runs(pieces, compute)` gives every piece's run, concatenated, and each one's length; `compute(new
    pieces)` gives the new ones' runs (concatenated, in order) and lengths. `clear()` forgets all
    (when what the integers mean changes)."""

    def __init__(self, dtype=np.int64):
        self.dtype = dtype
        self.clear()

    def clear(self) -> None:
        self._table: tuple | None = None
        self._start = np.zeros(0, dtype=np.int64)
        self._length = np.zeros(0, dtype=np.int64)
        self._have = np.zeros(0, dtype=bool)
        self._values = np.zeros(1 << 16, dtype=self.dtype)
        self._used = 0

    def runs(self, pieces: Pieces, compute) -> tuple[np.ndarray, np.ndarray]:
        if pieces.table != self._table:          # another table, or the table started again
            self.clear()
            self._table = pieces.table
        slots = pieces.slots
        if len(slots) and slots.max() >= len(self._have):
            size = max(2 * len(self._have), int(slots.max()) + 1)
            self._start, self._length = np.resize(self._start, size), np.resize(self._length, size)
            self._have = np.concatenate([self._have, np.zeros(size - len(self._have), dtype=bool)])
        new = np.flatnonzero(~self._have[slots])
        if len(new):
            values, lengths = compute(pieces.distinct.take(pa.array(new)))
            if self._used + len(values) > len(self._values):
                self._values = np.resize(self._values, max(2 * len(self._values), self._used + len(values)))
            self._values[self._used:self._used + len(values)] = values
            self._start[slots[new]] = self._used + np.cumsum(lengths) - lengths
            self._length[slots[new]] = lengths
            self._used += len(values)
            self._have[slots[new]] = True
        lengths = self._length[slots]
        return gather_runs(self._values, self._start[slots], lengths), lengths
