"""The per-level aggregates behind the views `cells_l1`, `cells_l12` and `cells_l123`: built with the
store, and brought up to date by an append without reading every label again.

Table `cells_<l>_data` per level holds, per non-empty cell: its codes, `cell` and `parent` keys,
`n_docs`, `n_tokens`, `quality_mean` (`q_sum / q_n`), `quality_p70`, `n_children`, `q_n`
(documents with a quality), `q_sum` (their qualities summed as an exact DECIMAL, so that a sum
does not depend on the order it was added in), `n_short` (documents under SHORT_CHARS characters,
for `cell_terms`), and its band's `q_below`, `band_lo`, `band_hi` and `band_len` (below; NULL for
an L123 cell without a band, and the last three for a cell without qualities). The views add the
shares, over the store's totals.

- An append adds the new rows' counts and sums to each cell's they fall in, at every level; a
  cell's `n_children` grows by the children the new rows made. All of these are exact, so they
  equal the build's sums over all the labels.
- Its 70th percentile needs the cell's values near it. Table `p70_window_<l>` keeps, per cell, the
  qualities at sorted positions [q_below, q_below + band_len): those ranked within ±WINDOW of the
  cell around the p70 in a cell of BAND_RANKS / WINDOW qualities or more; in a smaller cell the
  window doubles each time the cell halves, so a band keeps about ±BAND_RANKS ranks (`_windows`);
  an L1 or L12 cell of fewer than WHOLE_CELL qualities keeps all of them. An append merges the
  new values that fall inside a band (between `band_lo` and `band_hi`) into it and counts those
  below it into `q_below`; the p70 is read off the band at its position, interpolated linearly
  (DuckDB's `quantile_cont` may differ from it in the last bit, never where the two neighbours
  are equal). A band the p70 has moved out of (new values far to one side) is made again from
  `labels`, for those cells only. With new documents like the old, a band grows on both sides,
  so that is rare.
- An L123 cell of fewer than WHOLE_CELL qualities keeps no band (there are millions of them):
  its percentile is DuckDB's `quantile_cont` of its values, computed again from `labels` when an
  append touches it, as the build does. (Not by the bands' formula: DuckDB's wheel interpolates
  with a fused multiply-add, which SQL cannot write, and the two differed in the last bit in one
  cell in eight of a synthetic store.) It gets a band once it has WHOLE_CELL. An append reads the
  values of all such touched cells in one scan of `labels` (`_copy_values`), and makes their new
  bands from it.

The build makes the bands the same way, so the views of a store that grew by appends equal those
of one built at once (its bands may hold other values around the same percentiles).
Written here because DuckDB's quantile state cannot be kept between statements.
"""

from __future__ import annotations

from hermes.cellkeys import LEVELS, codes_match, codes_padded, codes_sql, key_sql, view_suffix

P70 = 0.7
WINDOW = 0.02               # a band holds the values ranked within ±2% of the cell around its p70 ...
BAND_RANKS = 16             # ... and at least about ±16 ranks: in a cell under 800 the window widens
WHOLE_CELL = 50             # ... or, in a cell of fewer qualities than this, all of them
SHORT_CHARS = 100           # a cell of mostly shorter texts is marked in cell_terms
DATA_COLUMNS = ("cell", "parent", "n_docs", "n_tokens", "quality_mean", "quality_p70", "n_children", "q_n", "q_sum",
                "n_short", "q_below", "band_lo", "band_hi", "band_len")
Q_SUM = "DECIMAL(38, 16)"    # exact sums of qualities under 1e12 over up to 1e10 documents
MAX_QUALITY = 1e12


def data_table(level: int) -> str:
    return f"cells_{view_suffix(level)}_data"


def _window_table(level: int) -> str:
    return f"p70_window_{view_suffix(level)}"


def _windows() -> list[tuple[int, float]]:
    """(smallest cell, window) per tier of cell sizes, largest first: ±WINDOW from BAND_RANKS /
    WINDOW qualities, then twice the window for every halving of the cell, down to WHOLE_CELL. A
    band is read as DuckDB's quantile_disc at p70 ± its window, so all tiers cost one aggregate."""
    tiers, size, window = [], BAND_RANKS / WINDOW, WINDOW
    while True:
        tiers.append((max(int(size), WHOLE_CELL), window))
        if size <= WHOLE_CELL:
            return tiers
        size, window = size / 2, window * 2


def has_current_layout(con) -> bool:
    """True if the store's aggregates are of this layout (an older store is aggregated again)."""
    rows = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                       [data_table(1)]).fetchall()
    windows = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    return {r[0] for r in rows} >= set(DATA_COLUMNS) and {_window_table(level) for level in LEVELS} <= windows


def build(con, named: list[int]) -> None:
    """Every level's aggregates and bands from `labels`, and the views."""
    for level in reversed(LEVELS):
        _aggregate(con, level, named, touched=None, fresh=None)
    create_views(con)


def update(con, named: list[int], fresh: str) -> dict[int, int]:
    """The aggregates after the rows of table `fresh` (already in `labels`) were added: only the
    cells they fall in change. The levels go finest first: each leaves the cells the new rows
    made in table born_<level>, which the next coarser level counts into n_children. Returns, per
    level, how many cells' bands were made again from `labels` (the p70 had left them)."""
    for level in LEVELS:
        con.execute(f"CREATE OR REPLACE TEMP TABLE touched_{level} AS SELECT DISTINCT {codes_sql(level)} FROM {fresh}")
    remade = {level: _aggregate(con, level, named, touched=f"touched_{level}", fresh=fresh)
              for level in reversed(LEVELS)}
    for level in LEVELS[1:]:
        con.execute(f"DROP TABLE born_{level}")
    create_views(con)
    return dict(sorted(remade.items()))


def _aggregate(con, level: int, named: list[int], touched: str | None, fresh: str | None) -> int:
    """Aggregate one level (its touched cells, or all); the number of bands made again."""
    cs = codes_sql(level)
    finest = level == LEVELS[-1]
    band = "CAST(NULL AS DOUBLE) AS band_lo, CAST(NULL AS DOUBLE) AS band_hi, CAST(NULL AS BIGINT) AS band_len"
    if finest and touched is None:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE agg AS
            SELECT {cs}, count(*) AS n_docs, CAST(sum(n_tokens) AS BIGINT) AS n_tokens,
                   count(quality) AS q_n, CAST(sum(CAST(quality AS {Q_SUM})) AS {Q_SUM}) AS q_sum,
                   count_if(n_chars < {SHORT_CHARS}) AS n_short, quantile_cont(quality, {P70}) AS quality_p70,
                   CAST(NULL AS BIGINT) AS n_children, CAST(NULL AS BIGINT) AS q_below, {band}
            FROM labels GROUP BY {cs}""")
    elif touched is None:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE agg AS
            SELECT {cs}, CAST(sum(n_docs) AS BIGINT) AS n_docs, CAST(sum(n_tokens) AS BIGINT) AS n_tokens,
                   CAST(sum(q_n) AS BIGINT) AS q_n, CAST(sum(q_sum) AS {Q_SUM}) AS q_sum,
                   CAST(sum(n_short) AS BIGINT) AS n_short, CAST(NULL AS DOUBLE) AS quality_p70,
                   count(*) AS n_children, CAST(0 AS BIGINT) AS q_below, {band}
            FROM {data_table(level + 1)} GROUP BY {cs}""")
    else:
        # counts and sums: the cell's as they were plus the new rows' (sums are exact, so this is
        # what a build sums); a cell's children: as many as it had, plus those the new rows made
        # (table born_<level + 1>); the percentile in _p70
        children = ("CAST(NULL AS BIGINT)" if finest else
                    "CAST(coalesce(d.n_children, 0) + coalesce(b.born, 0) AS BIGINT)")
        born = "" if finest else f"""
            LEFT JOIN (SELECT {cs}, count(*) AS born FROM born_{level + 1} GROUP BY {cs}) b ON {codes_match(level, 'b', 'n')}"""
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE agg AS
            SELECT {codes_sql(level, "n.")}, CAST(coalesce(d.n_docs, 0) + n.n_docs AS BIGINT) AS n_docs,
                   CAST(coalesce(d.n_tokens, 0) + n.n_tokens AS BIGINT) AS n_tokens,
                   CAST(coalesce(d.q_n, 0) + n.q_n AS BIGINT) AS q_n,
                   CAST(coalesce(d.q_sum, 0) + n.q_sum AS {Q_SUM}) AS q_sum,
                   CAST(coalesce(d.n_short, 0) + n.n_short AS BIGINT) AS n_short,
                   CAST(NULL AS DOUBLE) AS quality_p70, {children} AS n_children,
                   CAST({"NULL" if finest else "0"} AS BIGINT) AS q_below, {band}, d.n_docs IS NULL AS born
            FROM (SELECT {cs}, count(*) AS n_docs, sum(n_tokens) AS n_tokens, count(quality) AS q_n,
                         CAST(coalesce(sum(CAST(quality AS {Q_SUM})), 0) AS {Q_SUM}) AS q_sum,
                         count_if(n_chars < {SHORT_CHARS}) AS n_short
                  FROM {fresh} GROUP BY {cs}) n
            LEFT JOIN {data_table(level)} d ON {codes_match(level, 'd', 'n')}{born}""")
        if level > LEVELS[0]:
            con.execute(f"CREATE OR REPLACE TEMP TABLE born_{level} AS SELECT {cs} FROM agg WHERE born")
    remade = _p70(con, level, touched, fresh)
    key, joins = key_sql(level, named, "a")
    parent = key_sql(level - 1, named, "a")[0] if level > 1 else "CAST(NULL AS VARCHAR)"
    rows = f"""
        SELECT {codes_sql(level, "a.")}, {key} AS cell, {parent} AS parent, a.n_docs, a.n_tokens,
               CAST(a.q_sum AS DOUBLE) / NULLIF(a.q_n, 0) AS quality_mean, a.quality_p70, a.n_children,
               a.q_n, a.q_sum, a.n_short, a.q_below, a.band_lo, a.band_hi, a.band_len
        FROM agg a {joins}"""
    if touched is None:
        con.execute(f"CREATE OR REPLACE TABLE {data_table(level)} AS {rows} ORDER BY {cs}")
    else:
        con.execute(f"DELETE FROM {data_table(level)} d USING {touched} t WHERE {codes_match(level, 'd', 't')}")
        con.execute(f"INSERT INTO {data_table(level)} {rows}")
    con.execute("DROP TABLE agg")
    return remade


def _p70(con, level: int, touched: str | None, fresh: str | None) -> int:
    """Fill agg's quality_p70, q_below and band ends (band_lo, band_hi, band_len) from the cells'
    bands: made from `labels` at a build, merged with `fresh`'s values at an append. At L123 a
    cell under WHOLE_CELL qualities has no band: its p70 is quantile_cont of its values in
    `labels` (the build's aggregate has it; an append computes it again); a cell that reaches
    WHOLE_CELL gets one. Returns the number of bands made again."""
    cs, window = codes_sql(level), _window_table(level)
    finest = level == LEVELS[-1]
    if touched is None:
        con.execute(f"CREATE OR REPLACE TABLE {window} AS SELECT {cs}, quality FROM labels LIMIT 0")
        if finest:
            con.execute(f"CREATE OR REPLACE TEMP TABLE large AS SELECT {cs} FROM agg WHERE q_n >= {WHOLE_CELL}")
        _band(con, level, "large" if finest else None)
        con.execute("DROP TABLE IF EXISTS large")
    else:
        # each touched cell's band as it was: its ends, and whether it holds all the cell's values
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE band AS
            SELECT {cs}, q_below, q_n, band_lo AS lo, band_hi AS hi, coalesce(band_len, 0) AS len
            FROM {data_table(level)} SEMI JOIN {touched} USING ({cs})
            WHERE q_below IS NOT NULL""")
        # a new L1 or L12 cell starts a band holding all its values
        con.execute(f"""
            INSERT INTO {window}
            SELECT {codes_sql(level, "f.")}, f.quality FROM {fresh} f LEFT JOIN band b ON {codes_match(level, 'f', 'b')}
            WHERE f.quality IS NOT NULL
              AND ({"FALSE" if finest else "b.q_n IS NULL"} OR (b.q_below = 0 AND b.len = b.q_n)
                   OR f.quality BETWEEN b.lo AND b.hi)""")
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE below AS
            SELECT {codes_sql(level, "b.")}, b.q_below + count(f.quality) FILTER (
                WHERE NOT (b.q_below = 0 AND b.len = b.q_n) AND f.quality < b.lo) AS below
            FROM band b LEFT JOIN {fresh} f ON {codes_match(level, 'f', 'b')}
            GROUP BY {codes_sql(level, "b.")}, b.q_below""")
        con.execute(f"UPDATE agg SET q_below = n.below FROM below n WHERE {codes_match(level, 'agg', 'n')}")
        con.execute("DROP TABLE below")
        # a band that held its whole cell (or a new cell's) takes in every new value: once the cell
        # has twice WHOLE_CELL qualities, its band is made again from labels, narrow around the p70;
        # an L123 cell without a band gets one once it has WHOLE_CELL
        grows = (f"a.q_n >= {WHOLE_CELL} AND b.q_n IS NULL" if finest else
                 f"a.q_n >= {2 * WHOLE_CELL} AND (b.q_n IS NULL OR (b.q_below = 0 AND b.len = b.q_n))")
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE grown AS
            SELECT {codes_sql(level, "a.")} FROM agg a LEFT JOIN band b ON {codes_match(level, 'a', 'b')} WHERE {grows}""")
        if finest:
            # the values of the touched cells with no band (the small ones, and those that get a
            # band now), in one scan of labels
            con.execute(f"CREATE OR REPLACE TEMP TABLE unbanded AS SELECT {cs} FROM agg ANTI JOIN band USING ({cs})")
            _copy_values(con, level, "unbanded")
        if con.execute("SELECT count(*) FROM grown").fetchall()[0][0]:
            con.execute(f"DELETE FROM {window} w USING grown g WHERE {codes_match(level, 'w', 'g')}")
            if not finest:
                _copy_values(con, level, "grown")
            _band(con, level, "grown", source="cell_values")
        if finest:
            # the touched cells with no band: their p70 from their values, read in cell order (the
            # ORDER BY is for speed alone: DuckDB's grouped quantile is faster where a cell's values
            # come together)
            con.execute(f"""
                CREATE OR REPLACE TEMP TABLE p AS
                SELECT {cs}, quantile_cont(quality, {P70}) AS value
                FROM (SELECT * FROM cell_values SEMI JOIN (SELECT {cs} FROM unbanded ANTI JOIN grown USING ({cs}))
                      USING ({cs}) ORDER BY {cs})
                GROUP BY {cs}""")
            con.execute(f"UPDATE agg SET quality_p70 = p.value FROM p WHERE {codes_match(level, 'agg', 'p')}")
            con.execute("DROP TABLE p")
            con.execute("DROP TABLE unbanded")
        con.execute("DROP TABLE IF EXISTS cell_values")
        con.execute("DROP TABLE grown")
        con.execute("DROP TABLE band")
    _read_p70(con, level, None)         # the cells with a band (at L123 the others keep theirs)
    # a band the p70 has left: made again from labels, for those cells alone; one that still lacks
    # it (a small cell, whose ±WINDOW is less than a value) holds all the cell's values
    lost = _remake(con, level, whole=False) if touched is not None else 0
    _remake(con, level, whole=True)
    return lost


def _remake(con, level: int, whole: bool) -> int:
    """Make again from `labels` the bands of agg's cells that have a quality but no p70 (all their
    values if `whole`); how many there were."""
    cs = codes_sql(level)
    con.execute(f"CREATE OR REPLACE TEMP TABLE lost AS SELECT {cs} FROM agg WHERE q_n > 0 AND quality_p70 IS NULL")
    lost = con.execute("SELECT count(*) FROM lost").fetchall()[0][0]
    if lost:
        con.execute(f"DELETE FROM {_window_table(level)} w USING lost l WHERE {codes_match(level, 'w', 'l')}")
        _copy_values(con, level, "lost")
        _band(con, level, "lost", whole, source="cell_values")
        con.execute("DROP TABLE cell_values")
        _read_p70(con, level, "lost")
    con.execute("DROP TABLE lost")
    return lost


def _copy_values(con, level: int, cells: str) -> None:
    """Table cell_values: the qualities in `labels` of the cells in table `cells`, read in one scan
    (a band made from it reads `labels` once instead of three times)."""
    cs = codes_sql(level)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cell_values AS
        SELECT {cs}, quality FROM labels SEMI JOIN {cells} USING ({cs}) WHERE quality IS NOT NULL""")


def _band(con, level: int, cells: str | None, whole: bool = False, source: str = "labels") -> None:
    """Make the bands of agg's cells (those in table `cells`, or all) from their values in `source`
    (`labels`, or a copy of some cells' values; all of them if `whole`), and their q_below."""
    cs = codes_sql(level)
    semi = f"SEMI JOIN {cells} USING ({cs})" if cells else ""
    tiers = _windows()
    fractions = ", ".join(f"{max(P70 - w, 0.0):.6f}, {min(P70 + w, 1.0):.6f}" for _, w in tiers)
    small = "TRUE" if whole else f"n < {WHOLE_CELL}"

    def end(k: int, whole_end: str) -> str:
        picks = " ".join(f"WHEN n >= {size} THEN q[{2 * i + k}]" for i, (size, _) in enumerate(tiers))
        return f"CASE WHEN {small} THEN {whole_end} {picks} ELSE {whole_end} END"

    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE ends AS
        SELECT {cs}, {end(1, "mn")} AS lo, {end(2, "mx")} AS hi
        FROM (SELECT {cs}, count(quality) AS n, min(quality) AS mn, max(quality) AS mx,
                     quantile_disc(quality, [{fractions}]) AS q
              FROM {source} {semi} WHERE quality IS NOT NULL GROUP BY {cs})""")
    con.execute(f"""
        INSERT INTO {_window_table(level)}
        SELECT {codes_sql(level, "l.")}, l.quality FROM {source} l JOIN ends e ON {codes_match(level, 'l', 'e')}
        WHERE l.quality BETWEEN e.lo AND e.hi""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE below AS
        SELECT {codes_sql(level, "l.")}, count(*) FILTER (WHERE l.quality < e.lo) AS below
        FROM {source} l JOIN ends e ON {codes_match(level, 'l', 'e')} GROUP BY ALL""")
    con.execute(f"UPDATE agg SET q_below = n.below FROM below n WHERE {codes_match(level, 'agg', 'n')}")
    con.execute("DROP TABLE below")
    con.execute("DROP TABLE ends")


def _read_p70(con, level: int, cells: str | None) -> None:
    """agg's quality_p70 of its cells (those in table `cells`, or all) from their bands: the values
    lo and hi at positions floor and ceil of rn = 0.7 (n - 1) among the cell's qualities, as
    lo + (hi - lo) d with d = rn - floor(rn); NULL where the band lacks one of them. A band's values
    are ranked by a window (a sort per cell), and only the two wanted and the band's ends are kept:
    its lowest and highest value and its length (band_lo, band_hi, band_len) are kept with the
    cell, so that an append knows each band without reading its values."""
    cs = codes_sql(level)
    semi = f"SEMI JOIN {cells} USING ({cs})" if cells else ""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE p AS
        SELECT {cs}, lo + (hi - lo) * d AS value, band_lo, band_hi, band_len   -- exact where lo = hi, within [lo, hi]
        FROM (SELECT {codes_sql(level, "r.")}, min(r.quality) FILTER (WHERE r.k = a.lo_k) AS lo,
                     min(r.quality) FILTER (WHERE r.k = a.hi_k) AS hi, any_value(a.d) AS d,
                     min(r.quality) AS band_lo, max(r.quality) AS band_hi, max(r.k) + 1 AS band_len
              FROM (SELECT {cs}, quality, row_number() OVER w - 1 AS k, lead(TRUE) OVER w IS NULL AS last
                    FROM {_window_table(level)} SEMI JOIN agg USING ({cs}) {semi}
                    WINDOW w AS (PARTITION BY {cs} ORDER BY quality)) r
              JOIN (SELECT {cs}, floor(rn) - q_below AS lo_k, ceil(rn) - q_below AS hi_k, rn - floor(rn) AS d
                    FROM (SELECT {cs}, q_below, CAST(q_n - 1 AS DOUBLE) * {P70} AS rn FROM agg {semi})) a
              ON {codes_match(level, 'r', 'a')}
              WHERE r.k IN (a.lo_k, a.hi_k, 0) OR r.last
              GROUP BY {codes_sql(level, "r.")})""")
    con.execute(f"UPDATE agg SET quality_p70 = p.value, band_lo = p.band_lo, band_hi = p.band_hi, "
                f"band_len = p.band_len FROM p WHERE {codes_match(level, 'agg', 'p')}")
    con.execute("DROP TABLE p")


def create_views(con) -> None:
    """The views of the contract over the aggregates: cells_l1, cells_l12, cells_l123 and cells."""
    totals = f"(SELECT sum(n_docs) AS docs, sum(n_tokens) AS tokens FROM {data_table(1)}) t"
    for level in LEVELS:
        order = f" ORDER BY {codes_sql(level, 'd.')}" if level < LEVELS[-1] else ""
        con.execute(f"""
            CREATE OR REPLACE VIEW cells_{view_suffix(level)} AS
            SELECT {codes_sql(level, "d.")}, d.cell, d.parent, d.n_docs, d.n_tokens,
                   d.n_docs / t.docs AS share_docs, d.n_tokens / t.tokens AS share_tokens,
                   d.quality_mean, d.quality_p70, d.n_children
            FROM {data_table(level)} d CROSS JOIN {totals}{order}""")
    parts = []
    for level in LEVELS:
        parts.append(f"SELECT {level} AS level, {codes_padded(level)}, cell, parent, n_docs, n_tokens, share_docs, "
                     f"share_tokens, quality_mean, quality_p70, n_children FROM cells_{view_suffix(level)}")
    con.execute("CREATE OR REPLACE VIEW cells AS\n" + "\nUNION ALL\n".join(parts))
