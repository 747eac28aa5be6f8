"""Readable cells: the most distinctive words of each cell against its siblings (c-TF-IDF).

Streaming-friendly: each shard contributes a small table of word counts per L123 cell (its top
`TOP_PER_CELL` words per cell), written beside its label file; the store sums them up the
hierarchy and scores, per level, each cell's words against the cells that share its parent (all
L1 cells for L1), BERTopic's class-based TF-IDF:

    score(t, c) = tf(t, c) / words(c) * ln(1 + mean words per sibling cell / count of t in the siblings)

A cell whose documents are mostly very short gets the flag `[short texts]` before its words; one
whose most frequent word is over a fifth of its words gets `[repetitive]`; one with no words at
all (digits, symbols, markup) shows `[no words]`.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa

from hermes.quality import STOP_WORDS

TOP_PER_CELL = 100
TERMS_PER_CELL = 8
SHORT_CHARS = 100
TERM_SCHEMA = pa.schema([("c1", pa.int16()), ("c2", pa.int16()), ("c3", pa.int16()),
                         ("term", pa.string()), ("count", pa.int64())])
_WORD = re.compile(r"[^\W\d_]{3,30}")
EXTRA_STOP = frozenset("""also any can could did does just like more most much must now only other some such
very well how when where why into over under again further once here both each few own same too should
because while about against between through during before after above below off its itself them they
their theirs what which who whom this that these those am is are was were being been have has had having
do does doing would should could might will shall can't don't i'm it's you're we're they're""".split())
STOP = STOP_WORDS | EXTRA_STOP


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOP]


class TermCounter:
    """Word counts per L123 cell, fed batch by batch; keeps each cell's top words bounded."""

    PRUNE_EVERY = 50_000      # documents between prunings
    KEEP = 10 * TOP_PER_CELL  # words kept per cell when pruning

    def __init__(self):
        self.per_cell: dict[tuple[int, int, int], Counter] = {}
        self._since_prune = 0

    def add(self, texts: list[str], codes: np.ndarray) -> None:
        for text, code in zip(texts, codes):
            key = (int(code[0]), int(code[1]), int(code[2]))
            self.per_cell.setdefault(key, Counter()).update(words(text))
        self._since_prune += len(texts)
        if self._since_prune >= self.PRUNE_EVERY:
            for key, counts in self.per_cell.items():
                if len(counts) > self.KEEP:
                    self.per_cell[key] = Counter(dict(counts.most_common(self.KEEP)))
            self._since_prune = 0

    def table(self) -> pa.Table:
        rows: dict[str, list] = {"c1": [], "c2": [], "c3": [], "term": [], "count": []}
        for (a, b, c), counts in self.per_cell.items():
            for term, n in counts.most_common(TOP_PER_CELL):
                rows["c1"].append(a)
                rows["c2"].append(b)
                rows["c3"].append(c)
                rows["term"].append(term)
                rows["count"].append(n)
        return pa.table(rows, schema=TERM_SCHEMA)


def shard_term_counts(texts: list[str], codes: np.ndarray) -> pa.Table:
    """Word counts per L123 cell for one shard's documents (its top words per cell)."""
    counter = TermCounter()
    counter.add(texts, codes)
    return counter.table()


def _level_sql(level: int, named: list[int]) -> str:
    from hermes.store import key_sql

    key, joins = key_sql(level, named, "t")
    parent = "''" if level == 1 else key_sql(level - 1, named, "t")[0]
    lkey, ljoins = key_sql(level, named, "l")
    return f"""
    WITH c AS (SELECT {key} AS cell, {parent} AS grp, term, sum(count) AS n
               FROM term_counts t {joins} GROUP BY ALL),
    tot AS (SELECT cell, grp, sum(n) AS words, max(n) AS top_n FROM c GROUP BY cell, grp),
    sib AS (SELECT grp, avg(words) AS avg_words FROM tot GROUP BY grp),
    ft AS (SELECT grp, term, sum(n) AS f FROM c GROUP BY grp, term),
    scored AS (SELECT c.cell, c.term, (c.n / tot.words) * ln(1 + sib.avg_words / ft.f) AS score
               FROM c JOIN tot USING (cell, grp) JOIN sib USING (grp) JOIN ft USING (grp, term)),
    ranked AS (SELECT cell, term, row_number() OVER (PARTITION BY cell ORDER BY score DESC, term) AS rk
               FROM scored),
    top AS (SELECT cell, string_agg(term, ', ' ORDER BY rk) AS words FROM ranked
            WHERE rk <= {TERMS_PER_CELL} GROUP BY cell),
    docs AS (SELECT {lkey} AS cell, median(n_chars) AS median_chars FROM labels l {ljoins} GROUP BY ALL)
    SELECT {level} AS level, v.cell,
           concat_ws(' ',
               CASE WHEN d.median_chars < {SHORT_CHARS} THEN '[short texts]' END,
               CASE WHEN tot.top_n > 0.2 * tot.words THEN '[repetitive]' END,
               coalesce(top.words, '[no words]')) AS terms
    FROM cells_{['l1', 'l12', 'l123'][level - 1]} v
    LEFT JOIN top USING (cell) LEFT JOIN tot USING (cell) LEFT JOIN docs d USING (cell)"""


def create_cell_terms(con, term_files: list[str]) -> None:
    """Table cell_terms (level, cell, terms) from the shards' term-count files."""
    if term_files:
        con.execute("CREATE TEMP TABLE term_counts AS SELECT * FROM read_parquet(?)", [term_files])
    else:
        con.execute("CREATE TEMP TABLE term_counts (c1 SMALLINT, c2 SMALLINT, c3 SMALLINT, term VARCHAR, count BIGINT)")
    from hermes.store import named_stages

    named = named_stages(con)
    con.execute("CREATE TABLE cell_terms (level INTEGER, cell VARCHAR, terms VARCHAR)")
    for level in (1, 2, 3):
        con.execute(f"INSERT INTO cell_terms {_level_sql(level, named)} ORDER BY cell")
    con.execute("DROP TABLE term_counts")
