"""Readable cells: the most distinctive words of each cell against its siblings (c-TF-IDF).

Streaming-friendly: each shard contributes a small table of word counts per L123 cell (its top
`TOP_PER_CELL` words per cell), written beside its label file; the store sums them up the
hierarchy and scores, per level, each cell's words against the cells that share its parent (all
L1 cells for L1), BERTopic's class-based TF-IDF:

    score(t, c) = tf(t, c) / words(c) * ln(1 + mean words per sibling cell / count of t in the siblings)

A cell whose documents are mostly very short (over half under aggregates.SHORT_CHARS characters) gets the
flag `[short texts]` before its words; one whose most frequent word is over a fifth of its words
gets `[repetitive]`; one with no words at all (digits, symbols, markup) shows `[no words]`.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hermes.aggregates import data_table
from hermes.cellkeys import CODES, LEVELS
from hermes.quality import STOP_WORDS
from hermes.vectors import count_rows, rank_in_runs
from hermes.words import PieceRuns, Words

TOP_PER_CELL = 100
TERMS_PER_CELL = 8
TERM_SCHEMA = pa.schema([("c1", pa.int16()), ("c2", pa.int16()), ("c3", pa.int16()),
                         ("term", pa.string()), ("count", pa.int64())])
# A word: a run of 3 to 30 letters (Unicode category L) of the lowercased text, found by Arrow's
# compute kernels (RE2) in each distinct whitespace-separated word once (hermes.words), so that
# counting keeps pace with a fast encoder. Runs of over 30 letters
# are not words; number-letters (Roman numerals, superscripts) are not letters.
_NOT_LETTERS = r"[^\p{L}]+"
MIN_LETTERS, MAX_LETTERS = 3, 30
EXTRA_STOP = frozenset("""also any can could did does just like more most much must now only other some such
very well how when where why into over under again further once here both each few own same too should
because while about against between through during before after above below off its itself them they
their theirs what which who whom this that these those am is are was were being been have has had having
do does doing would should could might will shall can't don't i'm it's you're we're they're""".split())
STOP = STOP_WORDS | EXTRA_STOP
_STOP_SET = pa.array(sorted(STOP), pa.string())


def words(text: str) -> list[str]:
    """The counted words of one text, in order (what TermCounter counts, for one document)."""
    return _word_lists(pa.array([text], pa.string()))[0].to_pylist()


def _word_lists(texts: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The counted words of each text, flattened, and the index of the text each one came from."""
    lists = pc.split_pattern_regex(pc.utf8_lower(texts), _NOT_LETTERS)
    flat, parents = pc.list_flatten(lists), pc.list_parent_indices(lists)
    n = pc.utf8_length(flat)
    keep = pc.and_(pc.and_(pc.greater_equal(n, MIN_LETTERS), pc.less_equal(n, MAX_LETTERS)),
                   pc.invert(pc.is_in(flat, value_set=_STOP_SET)))
    return flat.filter(keep), parents.filter(keep)


def _top_per_cell(cells: np.ndarray, terms: list[str], cell: np.ndarray, term: np.ndarray, count: np.ndarray,
                  k: int) -> np.ndarray:
    """Each cell's k most frequent terms (ties by term), cells in code order: the positions in
    (cell, term, count) of the rows kept, in that order. `cells` (n, 3) are the codes `cell` indexes,
    `terms` the strings `term` indexes; a (cell, term) pair is in one row at most."""
    if not len(count):
        return np.zeros(0, dtype=np.int64)
    cell_rank = _ranks(np.lexsort(cells.T[::-1]))
    term_rank = _ranks(pc.array_sort_indices(pa.array(terms, pa.string())).to_numpy())
    # one sort key (cell rank, count descending, term rank) where it fits in 63 bits, else three
    bits = [max(int(n) - 1, 1).bit_length() for n in (len(cells), count.max() + 1, len(terms))]
    if sum(bits) <= 63:     # built in place: each temporary is as long as the counts
        key = cell_rank[cell]
        key <<= bits[1] + bits[2]
        part = count.max() - count
        part <<= bits[2]
        key |= part
        del part
        key |= term_rank[term]
        order = np.argsort(key, kind="stable")     # runs of it come sorted already (cells by id)
        del key
    else:
        order = np.lexsort((term_rank[term], -count, cell_rank[cell]))
    return order[rank_in_runs(cell[order]) < k]    # sorted by cell first: each cell's rows are one run


def _ranks(order: np.ndarray) -> np.ndarray:
    """The rank of each element, from the order that sorts them."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


class TermCounter:
    """Word counts per L123 cell, fed batch by batch; keeps each cell's top words bounded.

    Cells and terms get integer ids in order of first sight, and the counts are one sparse
    (cells, terms) matrix that the batches' counts are added to, a few batches at a time: memory
    holds the distinct (cell, term) pairs, not every batch's, and nothing is sorted by string
    until the end."""

    PRUNE_EVERY = 50_000      # documents between prunings
    KEEP = 10 * TOP_PER_CELL  # words kept per cell when pruning
    FOLD_ROWS = 1 << 20       # batch counts held before they are added to the sum, at least

    def __init__(self):
        self._start(np.zeros((0, 3), dtype=np.int64), [], None)
        self._since_prune = 0

    def _start(self, cells: np.ndarray, terms: list[str], summed) -> None:
        self._cells = cells                                    # (n, 3) codes of the cells seen
        self._cell_id = {int(p): i for i, p in enumerate(_packed(cells))}
        self._terms = terms                                    # the terms seen
        self._term_id = {t: i for i, t in enumerate(terms)}
        self._sum = summed                                     # scipy CSR (cells, terms) of int64 counts, or None
        self._parts: list[tuple[np.ndarray, ...]] = []         # (cell ids, term ids, counts) of batches not added yet
        self._held = 0
        self._piece_terms = PieceRuns()                         # each piece's term ids, while the ids hold

    def add(self, texts, codes: np.ndarray, words: Words | None = None) -> None:
        """Count the words of `texts` (a list of str or an Arrow string array) in the cells `codes`.
        A text's counted words are those of its whitespace-separated words (a run of letters never
        spans whitespace), so they are found once per distinct word (`words`, if the caller has
        split the texts already) and summed per cell by sparse products."""
        import scipy.sparse as sp

        if len(codes) == 0:
            return
        words = words if words is not None else Words.of(texts)
        if words.pieces is not None:      # each piece's terms found once while the encoder's table keeps it
            ids, lengths = self._piece_terms.runs(words.pieces, self._term_runs)
            occurrences = words.pieces.occurrences
        else:
            ids, lengths = self._term_runs(words.distinct)
            occurrences = words.occurrences
        in_word = count_rows(ids, lengths, max(len(self._terms), 1))     # (words or pieces, terms seen)
        cells, cell_of_doc = np.unique(np.asarray(codes, dtype=np.int64), axis=0, return_inverse=True)
        cell_of_doc = cell_of_doc.reshape(-1)
        in_cell = sp.csr_matrix((np.ones(len(cell_of_doc)), (cell_of_doc, np.arange(len(cell_of_doc)))),
                                shape=(len(cells), len(cell_of_doc)))
        counts = ((in_cell @ occurrences) @ in_word).tocoo()
        # held as int32 (12 bytes a row): a batch's count of a word in a cell is far below 2**31
        self._parts.append((self._ids(self._cell_id, _packed(cells).tolist(), cells).astype(np.int32)[counts.row],
                            counts.col.astype(np.int32), np.rint(counts.data).astype(np.int32)))
        self._held += counts.nnz
        if self._held > max(self._sum.nnz if self._sum is not None else 0, self.FOLD_ROWS):
            self._fold()
        self._since_prune += len(codes)
        if self._since_prune >= self.PRUNE_EVERY:
            self._start(*self._top(self.KEEP)[:3])
            self._since_prune = 0

    def _term_runs(self, words: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """The term ids of each word's counted words (new terms get ids), concatenated, and how
        many each word holds."""
        flat, parents = _word_lists(words)
        terms = pc.dictionary_encode(flat)
        ids = self._ids(self._term_id, terms.dictionary.to_pylist())[terms.indices.to_numpy()]
        return ids, np.bincount(parents.to_numpy(), minlength=len(words)).astype(np.int64)

    def _fold(self) -> None:
        """The batches' counts held since the last fold, added to the sum (as many rows as the sum
        holds, at least FOLD_ROWS, are held first: each fold costs the sum's size once)."""
        import scipy.sparse as sp

        if not self._parts:
            return
        cells, terms, counts = zip(*self._parts)
        self._parts = []
        # summed as int64: the batches held may count one word in one cell past 2**31 together
        part = sp.csr_matrix((np.concatenate(counts, dtype=np.int64), (np.concatenate(cells), np.concatenate(terms))),
                             shape=(len(self._cells), len(self._terms)))
        del cells, terms, counts
        if self._sum is None:
            self._sum = part
        else:
            self._sum.resize(part.shape)          # new cells and terms: more rows and columns
            self._sum = self._sum + part
        self._held = 0

    def _ids(self, index: dict, keys: list, cells: np.ndarray | None = None) -> np.ndarray:
        """The ids of `keys` in `index`, new ones added (for cells, with their codes)."""
        ids = np.fromiter(map(index.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        new = np.flatnonzero(ids < 0)
        if len(new):
            ids[new] = np.arange(len(index), len(index) + len(new))
            index.update(zip((keys[i] for i in new), ids[new].tolist()))
            if cells is None:
                self._terms.extend(keys[i] for i in new)
            else:
                self._cells = np.concatenate([self._cells, cells[new]])
        return ids

    def _top(self, k: int):
        """(cells, the terms kept, their counts as a CSR matrix, and as (cell, term, count) rows in
        order: cells by code, count descending, term): each cell's k most frequent terms, renumbered
        to the terms kept."""
        import scipy.sparse as sp

        self._fold()
        if self._sum is None or not self._sum.nnz:
            return self._cells, [], None, None
        summed = self._sum
        summed.sum_duplicates()
        cell = np.repeat(np.arange(summed.shape[0], dtype=np.int32), np.diff(summed.indptr))
        term, count = summed.indices, summed.data.astype(np.int64, copy=False)
        keep = _top_per_cell(self._cells, self._terms, cell, term, count, k)
        kept_terms, term_ids = np.unique(term[keep], return_inverse=True)
        rows = (cell[keep], term_ids.reshape(-1), count[keep])
        kept = sp.csr_matrix((rows[2], (rows[0], rows[1])), shape=(len(self._cells), len(kept_terms)))
        return self._cells, [self._terms[i] for i in kept_terms], kept, rows

    def table(self) -> pa.Table:
        cells, terms, _, rows = self._top(TOP_PER_CELL)
        if rows is None:
            return TERM_SCHEMA.empty_table()
        cell, term, count = rows
        return pa.table({**{f"c{i + 1}": pa.array(cells[cell, i], pa.int16()) for i in range(3)},
                         "term": pa.array(terms, pa.string()).take(pa.array(term)),
                         "count": pa.array(count, pa.int64())}, schema=TERM_SCHEMA)


def _packed(codes: np.ndarray) -> np.ndarray:
    """One int64 per (c1, c2, c3) (codes are int16 >= 0)."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1, 3)
    return (codes[:, 0] << 32) | (codes[:, 1] << 16) | codes[:, 2]


def shard_term_counts(texts: list[str], codes: np.ndarray) -> pa.Table:
    """Word counts per L123 cell for one shard's documents (its top words per cell)."""
    counter = TermCounter()
    counter.add(texts, codes)
    return counter.table()


def _level_sql(level: int) -> str:
    """Each level-`level` cell's words, from table term_counts: grouped and ranked on the integer
    codes (a cell's siblings share the codes of its parent); one row per cell that has words."""
    codes = list(CODES[:level])
    parent = codes[:-1] or ["g"]           # L1 cells are all siblings: one constant group g
    cs, ps = ", ".join(codes), ", ".join(parent)
    g = ", 0 AS g" if level == 1 else ""
    padded = ", ".join(c if c in codes else f"CAST(NULL AS SMALLINT) AS {c}" for c in CODES)
    return f"""
    WITH c AS (SELECT {cs}{g}, term, sum(count) AS n FROM term_counts GROUP BY ALL),
    tot AS (SELECT {cs}, sum(n) AS words, max(n) AS top_n FROM c GROUP BY ALL),
    sib AS (SELECT {ps}, avg(words) AS avg_words FROM tot {"GROUP BY ALL" if level > 1 else "CROSS JOIN (SELECT 0 AS g) GROUP BY g"}),
    ft AS (SELECT {ps}, term, sum(n) AS f FROM c GROUP BY ALL),
    scored AS (SELECT {", ".join(f"c.{x}" for x in codes)}, c.term,
                      (c.n / tot.words) * ln(1 + sib.avg_words / ft.f) AS score
               FROM c JOIN tot USING ({cs}) JOIN sib USING ({ps}) JOIN ft USING ({ps}, term)),
    ranked AS (SELECT {cs}, term, row_number() OVER (PARTITION BY {cs} ORDER BY score DESC, term) AS rk
               FROM scored),
    top AS (SELECT {cs}, string_agg(term, ', ' ORDER BY rk) AS words FROM ranked
            WHERE rk <= {TERMS_PER_CELL} GROUP BY ALL)
    SELECT {level} AS level, {padded}, top.words, tot.top_n > 0.2 * tot.words AS repetitive
    FROM tot JOIN top USING ({cs})"""


def _view_sql() -> str:
    """View cell_terms: every cell of every level with its flags (from the aggregates) and words."""
    parts = []
    for level in LEVELS:
        on = " AND ".join(f"w.c{i + 1} = d.c{i + 1}" for i in range(level))
        parts.append(f"""
    SELECT {level} AS level, d.cell,
           concat_ws(' ', CASE WHEN d.n_short * 2 > d.n_docs THEN '[short texts]' END,
                     CASE WHEN w.repetitive THEN '[repetitive]' END, coalesce(w.words, '[no words]')) AS terms
    FROM {data_table(level)} d LEFT JOIN cell_words w ON w.level = {level} AND {on}""")
    return "CREATE OR REPLACE VIEW cell_terms AS" + "\n    UNION ALL".join(parts)


def create_cell_terms(con, term_files: list[str]) -> None:
    """Table cell_words (each cell's most distinctive words, for the cells that have words) from the
    shards' term-count files, and the view cell_terms (level, cell, terms) over it and the
    per-level aggregates, which give every cell's flags: so an append that adds no words for a
    cell leaves its row to the aggregates."""
    if term_files:
        con.execute("CREATE OR REPLACE TEMP TABLE term_counts AS SELECT * FROM read_parquet(?)", [term_files])
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE term_counts (c1 SMALLINT, c2 SMALLINT, c3 SMALLINT, term VARCHAR, "
                    "count BIGINT)")
    kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'cell_terms'").fetchall()
    if kind:            # a table in stores of an earlier layout, a view since
        con.execute(f"DROP {'VIEW' if kind[0][0] == 'VIEW' else 'TABLE'} cell_terms")
    con.execute("CREATE OR REPLACE TABLE cell_words (level INTEGER, c1 SMALLINT, c2 SMALLINT, c3 SMALLINT, "
                "words VARCHAR, repetitive BOOLEAN)")
    for level in LEVELS:
        con.execute(f"INSERT INTO cell_words {_level_sql(level)}")
    con.execute("DROP TABLE term_counts")
    con.execute(_view_sql())
