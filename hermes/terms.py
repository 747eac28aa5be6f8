"""Readable cells: the most distinctive words of each cell against its siblings (c-TF-IDF).

Streaming-friendly: each shard contributes a small table of word counts per L123 cell (its top
`TOP_PER_CELL` words per cell), written beside its label file; the store sums them up the
hierarchy and scores, per level, each cell's words against the cells that share its parent (all
L1 cells for L1), BERTopic's class-based TF-IDF:

    score(t, c) = tf(t, c) / words(c) * ln(1 + mean words per sibling cell / count of t in the siblings)

the siblings' counts taken from a reference that appends keep until the store's word counts pass
the next power of two, so that an append ranks again only the cells it touches (below, "The store's words").

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
from hermes.cellkeys import CODES, LEVELS, codes_match, codes_padded, codes_sql, view_suffix
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


# The store's words. Each level-l cell's words are its terms ranked by
#
#     score(t, c) = n(t, c) * ln(1 + avg_words(p) / f(t, p))
#
# (c-TF-IDF without its division by the cell's word count, which does not change a cell's ranking),
# ties by term: n(t, c) the cell's count of t over all term files; f(t, p) and avg_words(p) the
# count of t among the cells that share c's parent p (all L1 cells at L1), and their mean word
# count, in the *reference*: the first term files (in shard order) holding at least 2^k word-count
# rows, 2^k the largest power of two the store's term files reach (so at least half of their
# rows). A term the reference lacks among p's cells counts as 1 there; a parent it lacks has
# avg_words 1 (its cells' words are then their most frequent ones). So the words depend on the
# order of the shards: those after the reference count in their own cells, not among the siblings.
#
# While appends keep the term files' rows under 2^(k+1), the reference stays, so a term's weight in
# a cell never changes: an append adds the new counts (word_counts_<l>, as rows of their own) and
# ranks, in each cell it touches, the cell's kept top terms (word_top_<l>) together with the terms
# it counted; a term neither kept nor counted cannot overtake them (its score is unchanged, theirs
# can only grow). That reads the new term files, and scans the stored counts once a level, but
# scores only the touched cells. An append past 2^(k+1) takes the reference again and scores every
# cell (about once each time the store doubles). A store built at once from the same files has the
# same reference, so the same words. Terms are integer ids (word_terms; in term order after a
# build, new terms numbered after the others by an append) so that the tables stay small.
_WORD_STATE = "word_reference"  # one row: the layout, files and rows in the reference and in all term files
_WORDS_LAYOUT = f"1:{TERMS_PER_CELL}"     # an append to words of another layout scores them all again


def _table(kind: str, level: int) -> str:
    return f"word_{kind}_{view_suffix(level)}"


def _scored_sql(level: int, source: str) -> str:
    """Rows (codes, id, n) of `source` with their score against the reference."""
    parent = codes_sql(level - 1)
    avg = f"USING ({parent})" if parent else "ON TRUE"
    return f"""
        SELECT {codes_sql(level, "s.")}, s.id, s.n, s.n * ln(1 + coalesce(a.avg_words, 1) / coalesce(r.n, 1)) AS score
        FROM {source} s LEFT JOIN {_table('avg', level)} a {avg}
        LEFT JOIN {_table('ref', level)} r USING ({parent + ', ' if parent else ''}id)"""


def _keep_top(con, level: int, ranked: str, totals: str) -> None:
    """Rows of word_top_<level> and cell_words from `ranked` (codes, id, n, rk: each cell's best
    terms, rk from 1) and `totals` (codes, n_words, top_n: each cell's word count and top count)."""
    cs = codes_sql(level)
    con.execute(f"INSERT INTO {_table('top', level)} SELECT {cs}, id, n FROM {ranked} ORDER BY ALL")
    # the words in rank order by one column per rank: DuckDB spills such an aggregate to disk where
    # it outgrows the memory budget, but not an ordered string_agg
    ranks = ", ".join(f"any_value(w.term) FILTER (rk = {k})" for k in range(1, TERMS_PER_CELL + 1))
    con.execute(f"""
        INSERT INTO cell_words
        SELECT {level}, {codes_padded(level)}, words, top_n > 0.2 * n_words, n_words, top_n FROM (
            SELECT {cs}, concat_ws(', ', {ranks}) AS words FROM {ranked} JOIN word_terms w USING (id)
            GROUP BY ALL) JOIN {totals} USING ({cs})""")


def _view_sql() -> str:
    """View cell_terms: every cell of every level with its flags (from the aggregates) and words."""
    parts = []
    for level in LEVELS:
        on = codes_match(level, "w", "d")
        parts.append(f"""
    SELECT {level} AS level, d.cell,
           concat_ws(' ', CASE WHEN d.n_short * 2 > d.n_docs THEN '[short texts]' END,
                     CASE WHEN w.repetitive THEN '[repetitive]' END, coalesce(w.words, '[no words]')) AS terms
    FROM {data_table(level)} d LEFT JOIN cell_words w ON w.level = {level} AND {on}""")
    return "CREATE OR REPLACE VIEW cell_terms AS" + "\n    UNION ALL".join(parts)


def _rows(con, files: list[str]) -> list[int]:
    """The rows of each term file (from its footer)."""
    if not files:
        return []
    got = dict(con.execute("SELECT file_name, num_rows FROM parquet_file_metadata(?)", [files]).fetchall())
    return [int(got[f]) for f in files]


def _reference(rows: list[int]) -> int:
    """How many leading term files form the reference (see above), given each file's rows."""
    total = sum(rows)
    if not total:
        return len(rows)
    floor, held = 1 << (total.bit_length() - 1), 0
    for i, r in enumerate(rows):
        held += r
        if held >= floor:
            return i + 1
    return len(rows)


def _read(con, name: str, files: list[str], temp: bool = True, codes: str = "c1, c2, c3") -> None:
    """Table `name` (codes, id, n): the files' counts summed per cell (of `codes`) and term (whose
    id word_terms holds); a stored one in key order. One step at a time (the files' rows with their
    term ids, then summed, then sorted): as one statement, the sum and the sort each took the
    memory budget as theirs, and it ran out of memory at 10M documents under 256 MB."""
    types = ", ".join(f"{c} SMALLINT" for c in codes.split(", "))
    con.execute(f"CREATE OR REPLACE {'TEMP ' if temp else ''}TABLE {name} ({types}, id INTEGER, n BIGINT)")
    if not files:
        return
    con.execute(f"CREATE OR REPLACE TEMP TABLE words_read AS SELECT {codes}, id, count FROM read_parquet(?) "
                "JOIN word_terms USING (term)", [files])
    summed = f"SELECT {codes}, id, CAST(sum(count) AS BIGINT) FROM words_read GROUP BY ALL"
    if temp:
        con.execute(f"INSERT INTO {name} {summed}")
        con.execute("DROP TABLE words_read")
    else:
        con.execute(f"CREATE OR REPLACE TEMP TABLE words_summed AS {summed}")
        con.execute("DROP TABLE words_read")
        con.execute(f"INSERT INTO {name} SELECT * FROM words_summed ORDER BY ALL")
        con.execute("DROP TABLE words_summed")


def _sum_up(con, source: str, name: str, level: int, temp: bool = False, codes: str | None = None) -> None:
    """Table `name` (codes, id, n): `source`'s counts (c1, c2, c3, id, n) summed to the level's
    codes (or to `codes`); a stored table in key order (which halves its size on disk)."""
    cs = codes_sql(level) if codes is None else codes
    con.execute(f"CREATE OR REPLACE {'TEMP ' if temp else ''}TABLE {name} AS "
                f"SELECT {cs + ', ' if cs else ''}id, CAST(sum(n) AS BIGINT) AS n FROM {source} GROUP BY ALL"
                + ("" if temp else " ORDER BY ALL"))


def _word_tables(con) -> None:
    """The store's empty word tables (see above)."""
    con.execute("CREATE OR REPLACE TABLE cell_words (level INTEGER, c1 SMALLINT, c2 SMALLINT, c3 SMALLINT, "
                "words VARCHAR, repetitive BOOLEAN, n_words BIGINT, top_n BIGINT)")
    for level in LEVELS:
        codes = ", ".join(f"{c} SMALLINT" for c in CODES[:level])
        con.execute(f"CREATE OR REPLACE TABLE {_table('top', level)} ({codes}, id INTEGER, n BIGINT)")


def create_cell_terms(con, term_files: list[str]) -> None:
    """The store's words from the shards' term-count files (all of them, in shard order): the terms,
    each level's counts, the reference, each cell's top terms, table cell_words (each cell's words,
    for the cells that have words) and the view cell_terms (level, cell, terms) over it and the
    per-level aggregates, which give every cell's flags."""
    rows = _rows(con, term_files)
    ref_files = _reference(rows)
    kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'cell_terms'").fetchall()
    if kind:            # a table in stores of an earlier layout, a view since
        con.execute(f"DROP {'VIEW' if kind[0][0] == 'VIEW' else 'TABLE'} cell_terms")
    # ids in term order (a build ranks ties by id), then the counts summed per cell and term id
    con.execute("CREATE OR REPLACE TABLE word_terms (id INTEGER, term VARCHAR)")
    if term_files:
        con.execute("INSERT INTO word_terms SELECT CAST(row_number() OVER (ORDER BY term) - 1 AS INTEGER), term "
                    "FROM (SELECT DISTINCT term FROM read_parquet(?))", [term_files])
    _read(con, _table("counts", 3), term_files, temp=False)
    for level in (2, 1):
        _sum_up(con, _table("counts", level + 1), _table("counts", level), level)
    # word_ref_<l>, what a level-l cell is scored against: the reference's counts of the level
    # above (keyed by the parent's codes; by term alone at L1), the store's own where the reference
    # is every term file; and words_ref_totals, the word count of each L123 cell in the reference
    whole = ref_files == len(term_files)
    for level in reversed(LEVELS):
        if whole and level > 1:
            con.execute(f"CREATE OR REPLACE TABLE {_table('ref', level)} AS SELECT * FROM {_table('counts', level - 1)}")
        elif level == 3:    # the first files' counts of each L12 cell and term, read again
            _read(con, _table("ref", 3), term_files[:ref_files], temp=False, codes=codes_sql(2))
        else:
            _sum_up(con, _table("ref", level + 1), _table("ref", level), level, codes=codes_sql(level - 1))
    source, args = (f"(SELECT *, n AS count FROM {_table('counts', 3)})", []) if whole else \
        ("read_parquet(?) WHERE term IS NOT NULL", [term_files[:ref_files]])   # the rows the join to ids keeps
    con.execute(f"CREATE OR REPLACE TEMP TABLE words_ref_totals AS SELECT {codes_sql(3)}, sum(count) AS words "
                f"FROM {source} GROUP BY ALL", args)
    _word_tables(con)
    for level in LEVELS:
        cs, ps = codes_sql(level), codes_sql(level - 1)
        # each parent's mean word count over its cells, in the reference
        totals = "words_ref_totals" if level == 3 else \
            f"(SELECT {cs}, sum(n) AS words FROM {_table('ref', level + 1)} GROUP BY ALL)"
        con.execute(f"CREATE OR REPLACE TABLE {_table('avg', level)} AS "
                    f"SELECT {ps + ', ' if ps else ''}avg(words) AS avg_words FROM {totals}"
                    + (" GROUP BY ALL" if ps else ""))
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE words_ranked AS SELECT * FROM (
                SELECT {cs}, id, n, row_number() OVER (PARTITION BY {cs} ORDER BY score DESC, id) AS rk
                FROM ({_scored_sql(level, _table('counts', level))}))
            WHERE rk <= {TERMS_PER_CELL}""")
        con.execute(f"CREATE OR REPLACE TEMP TABLE words_totals AS SELECT {cs}, CAST(sum(n) AS BIGINT) AS n_words, "
                    f"max(n) AS top_n FROM {_table('counts', level)} GROUP BY ALL")
        _keep_top(con, level, "words_ranked", "words_totals")
    con.execute(f"CREATE OR REPLACE TABLE {_WORD_STATE} AS SELECT ? AS layout, ? AS files, ? AS ref_files, "
                "? AS ref_rows, ? AS total_rows",
                [_WORDS_LAYOUT, len(term_files), ref_files, sum(rows[:ref_files]), sum(rows)])
    for t in ("words_ranked", "words_totals", "words_ref_totals"):
        con.execute(f"DROP TABLE {t}")
    con.execute(_view_sql())


def _can_add(con, files: int, added: int) -> bool:
    """Whether an append of `added` word-count rows to the store's words from `files` term files
    keeps their reference: words of this layout, from those files, not past the next power of two."""
    held = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [_WORD_STATE]).fetchall()[0][0] and \
        con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'cell_terms'").fetchall()[0][0]
    if not held:                # a store of an earlier layout
        return False
    layout, had_files, total = con.execute(f"SELECT layout, files, total_rows FROM {_WORD_STATE}").fetchall()[0]
    return layout == _WORDS_LAYOUT and had_files == files and total > 0 and \
        (total + added).bit_length() == total.bit_length()


def update_cell_terms(con, term_files: list[str], new: int) -> None:
    """The store's words after an append: `term_files` all the shards' (in shard order), the last
    `new` of them the append's. Adds the new counts and ranks again the terms of the cells they
    touch (see above); takes the reference again and scores every cell (create_cell_terms) where
    the new rows take the store past the next power of two, or the store is of an earlier layout."""
    old = term_files[:max(len(term_files) - new, 0)]
    fresh = term_files[len(old):]
    added = sum(_rows(con, fresh))
    if not _can_add(con, len(old), added):
        create_cell_terms(con, term_files)
        return
    if fresh:           # their new terms numbered after the others
        con.execute("""
            INSERT INTO word_terms
            SELECT CAST((SELECT coalesce(max(id), -1) FROM word_terms) + row_number() OVER (ORDER BY term) AS INTEGER),
                   term
            FROM (SELECT DISTINCT term FROM read_parquet(?) ANTI JOIN word_terms USING (term))""", [fresh])
    _read(con, "words_new", fresh)
    for level in LEVELS:
        cs = codes_sql(level)
        counts, top = _table("counts", level), _table("top", level)
        _sum_up(con, "words_new", "words_delta", level, temp=True)
        # the new counts added as rows of their own (rows already written are not touched, which
        # saves the commit rewriting them); words_counted: the counts they changed, summed
        con.execute(f"INSERT INTO {counts} SELECT * FROM words_delta")
        con.execute(f"CREATE OR REPLACE TEMP TABLE words_counted AS SELECT {cs}, id, CAST(sum(n) AS BIGINT) AS n "
                    f"FROM {counts} SEMI JOIN words_delta USING ({cs}, id) GROUP BY ALL")
        # the touched cells' totals: the word count grows by the new counts, the top count is the larger
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE words_totals AS
            SELECT {cs}, CAST(coalesce(o.n_words, 0) + d.added AS BIGINT) AS n_words,
                   greatest(coalesce(o.top_n, 0), u.top_n) AS top_n
            FROM (SELECT {cs}, sum(n) AS added FROM words_delta GROUP BY ALL) d
            JOIN (SELECT {cs}, max(n) AS top_n FROM words_counted GROUP BY ALL) u USING ({cs})
            LEFT JOIN (SELECT {cs}, n_words, top_n FROM cell_words WHERE level = {level}) o USING ({cs})""")
        # each touched cell's kept terms (those not counted again) and those counted, ranked; ties
        # by term (an append's new ids are not in term order)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE words_ranked AS SELECT {cs}, id, n, rk FROM (
                SELECT *, row_number() OVER (PARTITION BY {cs} ORDER BY score DESC, term) AS rk
                FROM ({_scored_sql(level, f"(SELECT * FROM {top} SEMI JOIN words_totals USING ({cs}) ANTI JOIN words_delta USING ({cs}, id) UNION ALL SELECT * FROM words_counted)")})
                JOIN word_terms USING (id))
            WHERE rk <= {TERMS_PER_CELL}""")
        on_cell = codes_match(level, "w", "t")
        con.execute(f"DELETE FROM {top} w USING words_totals t WHERE {on_cell}")
        con.execute(f"DELETE FROM cell_words w USING words_totals t WHERE w.level = {level} AND {on_cell}")
        _keep_top(con, level, "words_ranked", "words_totals")
        for t in ("words_delta", "words_counted", "words_totals", "words_ranked"):
            con.execute(f"DROP TABLE {t}")
    con.execute(f"UPDATE {_WORD_STATE} SET files = ?, total_rows = total_rows + ?", [len(term_files), added])
    con.execute("DROP TABLE words_new")
