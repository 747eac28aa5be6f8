"""hermes eval (schema, orderings) and cell_terms (every non-empty cell, readable)."""

from __future__ import annotations

import json

import duckdb
import pytest

from tests.conftest import invoke

METHODS = {"hermes", "plain_rvq", "kmeans"}
STRUCTURE = {"cells", "effective_cells", "entropy", "gini", "mean_cos_to_centroid", "recall_at_10"}
GOLD = {"docs", "nmi", "ari", "homogeneity", "completeness", "purity"}


def test_eval_json_schema_and_orderings(e2e):
    r = invoke("eval", "--db", e2e["db"], "--gold", "labels.l1,leaf", "--format", "json", "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["sample"] == 300 and res["substrate"] == e2e["summary"]["substrate"]
    assert set(res["levels"]) == {"L1", "L12", "L123"}
    for level in res["levels"].values():
        assert set(level) == METHODS and all(set(v) == STRUCTURE for v in level.values())
    h = res["levels"]
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    codes = {d: (c1, c2, c3) for d, c1, c2, c3 in con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall()}
    con.close()
    for lv, name in ((1, "L1"), (2, "L12"), (3, "L123")):        # every stored document is in the sample
        assert h[name]["hermes"]["cells"] == len({c[:lv] for c in codes.values()})
    assert h["L1"]["kmeans"]["cells"] == h["L1"]["hermes"]["cells"]
    for method in ("hermes", "plain_rvq"):
        errs = res["reconstruction"][method]
        assert len(errs) == 3 and errs[0] > errs[1] > errs[2]
    leaf = {r["id"]: r["leaf"] for r in e2e["records"]}
    for lv, name in ((1, "L1"), (2, "L12"), (3, "L123")):        # purity, counted here from the store and the corpus
        by_cell = {}
        for d, c in codes.items():
            by_cell.setdefault(c[:lv], []).append(leaf[d])
        purity = sum(max(v.count(x) for x in set(v)) for v in by_cell.values()) / len(codes)
        assert res["gold"]["leaf"][name]["hermes"]["purity"] == pytest.approx(purity, abs=1e-4)
    assert all(set(v) == GOLD for lv in res["gold"]["labels.l1"].values() for v in lv.values())


def test_eval_table_and_bad_gold_field(e2e):
    r = invoke("eval", "--db", e2e["db"], "--quiet")
    assert r.exit_code == 0 and "recall_at_10" in r.stdout and "plain_rvq" in r.stdout
    r = invoke("eval", "--db", e2e["db"], "--gold", "labels.nope", "--quiet")
    assert r.exit_code == 1 and "gold field 'labels.nope' is in none" in r.stderr


def test_cell_terms_for_every_non_empty_cell(e2e):
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    missing = con.execute("""SELECT count(*) FROM cells c LEFT JOIN cell_terms t USING (level, cell)
                             WHERE t.terms IS NULL OR t.terms = ''""").fetchall()[0][0]
    extra = con.execute("SELECT count(*) FROM cell_terms t ANTI JOIN cells c USING (level, cell)").fetchall()[0][0]
    sample = con.execute("SELECT terms FROM cell_terms WHERE level = 1").fetchall()
    con.close()
    assert missing == 0 and extra == 0
    assert all(len(t.split(", ")) >= 3 for (t,) in sample)


def test_cells_command_shows_terms(e2e):
    r = invoke("cells", "--db", e2e["db"], "--level", "1", "--format", "json")
    rows = json.loads(r.stdout)
    assert rows and all(row["terms"] for row in rows)


def test_short_and_wordless_cells_are_flagged():
    from hermes.terms import shard_term_counts, words

    assert words("The the THE keyboard 1234 ###") == ["keyboard"]
    t = shard_term_counts(["hello hello world", "12345"], __import__("numpy").array([[0, 0, 0], [1, 0, 0]]))
    assert {(r["c1"], r["term"]) for r in t.to_pylist()} == {(0, "hello"), (0, "world")}


def test_term_counts_equal_a_plain_python_count(sample_records):
    """Per cell, the counted words are the runs of 3 to 30 letters of the lowercased text, stop words
    out, counted over the cell's documents (the top TOP_PER_CELL per cell kept)."""
    import re
    from collections import Counter

    import numpy as np

    from hermes.terms import STOP, TOP_PER_CELL, TermCounter

    texts = [r["text"] for r in sample_records] + ["Ünïcödé wörds: ÉCOLE école", "a" * 31 + " short ok"]
    codes = np.random.default_rng(0).integers(0, 4, (len(texts), 3))
    counter = TermCounter()
    counter.add(texts[:100], codes[:100])
    counter.add(texts[100:], codes[100:])
    expected: dict = {}
    for text, code in zip(texts, codes):
        words = [w for w in re.findall(r"[^\W\d_]+", text.lower()) if 3 <= len(w) <= 30 and w not in STOP]
        expected.setdefault(tuple(int(c) for c in code), Counter()).update(words)
    got = counter.table().to_pylist()
    assert got and all(expected[(r["c1"], r["c2"], r["c3"])][r["term"]] == r["count"] for r in got)
    for cell, counts in expected.items():
        mine = [r for r in got if (r["c1"], r["c2"], r["c3"]) == cell]
        assert len(mine) == min(TOP_PER_CELL, len(counts))
        assert min(r["count"] for r in mine) >= sorted(counts.values(), reverse=True)[len(mine) - 1]
    assert "école" in {r["term"] for r in got} and "a" * 31 not in {r["term"] for r in got}


def test_term_counts_keep_each_cells_top_words_in_order_across_batches_and_prunings(monkeypatch):
    """The term table holds, per cell, the TOP_PER_CELL most frequent words, ties by word, cells
    in code order: over many batches, added to the sum one by one or together, and when the counts
    are pruned between them (to KEEP words per cell, here more than any cell has, so pruning loses
    nothing)."""
    from collections import Counter

    import numpy as np

    from hermes.terms import TOP_PER_CELL, TermCounter

    rng = np.random.default_rng(1)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(400)]
    texts = [" ".join(rng.choice(vocab, rng.integers(1, 40), p=None)) for _ in range(600)]
    codes = np.stack([rng.integers(0, 3, 600), rng.integers(0, 2, 600), rng.integers(0, 300, 600) % 2], axis=1)
    expected: dict = {}
    for text, code in zip(texts, codes):
        expected.setdefault(tuple(int(c) for c in code), Counter()).update(text.split())
    want = [(*cell, term, n) for cell in sorted(expected)
            for term, n in sorted(expected[cell].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PER_CELL]]
    for prune_every, fold_rows in ((10**9, 1 << 20), (10**9, 0), (100, 0)):     # 0: each batch added at once
        monkeypatch.setattr(TermCounter, "PRUNE_EVERY", prune_every)
        monkeypatch.setattr(TermCounter, "FOLD_ROWS", fold_rows)
        counter = TermCounter()
        for i in range(0, len(texts), 70):
            counter.add(texts[i:i + 70], codes[i:i + 70])
        got = [tuple(r.values()) for r in counter.table().to_pylist()]
        assert got == want, (prune_every, fold_rows)


def test_rank_in_runs_equals_rank_within_where_the_groups_are_runs():
    """The terms' pruning ranks rows sorted by cell without a second sort: the same ranks as the
    sorting rank_within (which ranks its sorted groups so) and as a plain count, for runs of any
    lengths (and no rows, and one)."""
    from collections import Counter

    import numpy as np

    from hermes.vectors import rank_in_runs, rank_within

    def counted(groups):
        seen = Counter()
        return [seen.update([g]) or seen[g] - 1 for g in groups.tolist()]

    rng = np.random.default_rng(2)
    cases = [np.zeros(0, np.int64), np.array([7]), np.sort(rng.integers(0, 50, 1000)),
             np.repeat(rng.permutation(30), rng.integers(1, 9, 30))]      # runs not in value order
    for groups in cases:
        assert rank_in_runs(groups).tolist() == rank_within(groups).tolist() == counted(groups)
    mixed = rng.integers(0, 9, 500)                                   # groups not in runs: rank_within sorts
    assert rank_within(mixed).tolist() == counted(mixed)
    assert rank_in_runs(np.array([4, 4, 1, 1, 1, 4])).tolist() == [0, 1, 0, 1, 2, 0]     # a run again: ranks anew


def test_flags_in_a_store(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from hermes.store import create_views
    from hermes.terms import create_cell_terms, shard_term_counts

    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    docs = ["ok", "## 42", "a long enough document about gardens and roses and soil " * 5]
    codes = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]])
    con.execute("CREATE TABLE labels AS SELECT * FROM (VALUES ('a', 2, 1, 0.1, 0, 0, 0), ('b', 5, 1, 0.1, 1, 0, 0), "
                "('c', 270, 60, 0.9, 2, 0, 0)) t(doc_id, n_chars, n_tokens, quality, c1, c2, c3)")
    create_views(con)
    pq.write_table(shard_term_counts(docs, codes), tmp_path / "t.parquet")
    create_cell_terms(con, [str(tmp_path / "t.parquet")])
    terms = dict(con.execute("SELECT cell, terms FROM cell_terms WHERE level = 1").fetchall())
    assert terms["0"].startswith("[short texts]") and "[no words]" in terms["1"]
    assert terms["2"].split(", ")[0] in {"gardens", "roses", "soil", "document", "long", "enough"}


def _word_rows(con) -> dict[str, list]:
    """What a store's words are made of, with terms as text (ids may differ between stores)."""
    from hermes.cellkeys import LEVELS, view_suffix

    out = {"cell_words": con.execute("SELECT * FROM cell_words ORDER BY ALL").fetchall(),
           "cell_terms": con.execute("SELECT * FROM cell_terms ORDER BY ALL").fetchall(),
           "reference": con.execute("SELECT * FROM word_reference").fetchall()}
    for level in LEVELS:
        s = view_suffix(level)
        for kind in ("counts", "top", "ref"):        # an append adds counts as rows of their own
            out[f"{kind}_{s}"] = con.execute(f"SELECT * EXCLUDE (id, n), term, sum(n) FROM word_{kind}_{s} "
                                             "JOIN word_terms USING (id) GROUP BY ALL ORDER BY ALL").fetchall()
        out[f"avg_{s}"] = con.execute(f"SELECT * FROM word_avg_{s} ORDER BY ALL").fetchall()
    return out


def _term_files(tmp_path, n_files: int = 8) -> list[str]:
    """Small synthetic term files (as `hermes label` writes beside each label file): small cells, a
    Zipf-like vocabulary that grows (later terms sort first), one count of 40 in the first file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hermes.terms import TERM_SCHEMA

    rng = np.random.default_rng(5)
    files = []
    for k in range(n_files):
        n = int(rng.integers(20, 120))
        vocab = [f"w{i:03d}" for i in range(60)] + [f"a{9 - k}{i}" for i in range(5)]
        rows = {(int(rng.integers(0, 3)), int(rng.integers(0, 3)), int(rng.integers(0, 4)),
                 vocab[min(int(rng.zipf(1.3)) - 1, 59) if rng.random() < 0.8 else int(rng.integers(60, 65))])
                for _ in range(n)}
        table = pa.Table.from_pylist([{"c1": a, "c2": b, "c3": c, "term": t,
                                       "count": 40 if k == 0 and t == "w000" else int(rng.integers(1, 3))}
                                      for a, b, c, t in sorted(rows)], schema=TERM_SCHEMA)
        files.append(str(tmp_path / f"t{k}.parquet"))
        pq.write_table(table, files[-1])
    return files


def _plain_words(files: list[str]) -> dict[tuple, str]:
    """Each cell's words (level and codes to the words), counted in plain Python from the term files
    as hermes/terms.py says: score n(t, c) * ln(1 + avg_words(p) / f(t, p)), f and avg_words from
    the first files holding 2^k rows (2^k the largest power of two of all their rows), ties by term."""
    import math
    from collections import Counter, defaultdict

    import pyarrow.parquet as pq

    tables = [pq.read_table(f).to_pylist() for f in files]
    total, held, ref = sum(map(len, tables)), 0, len(tables)
    for i, t in enumerate(tables):
        held += len(t)
        if held >= 2 ** (total.bit_length() - 1):
            ref = i + 1
            break
    words = {}
    for level in (1, 2, 3):
        counts, in_ref, cell_words = Counter(), Counter(), defaultdict(Counter)
        for i, table in enumerate(tables):
            for r in table:
                cell = (r["c1"], r["c2"], r["c3"])[:level]
                counts[cell, r["term"]] += r["count"]
                if i < ref:
                    in_ref[cell[:-1], r["term"]] += r["count"]
                    cell_words[cell[:-1]][cell] += r["count"]
        avg = {p: sum(c.values()) / len(c) for p, c in cell_words.items()}
        by_cell = defaultdict(list)
        for (cell, term), n in counts.items():
            by_cell[cell].append((-n * math.log(1 + avg.get(cell[:-1], 1) / in_ref.get((cell[:-1], term), 1)), term))
        for cell, scored in by_cell.items():
            words[(level, *cell)] = ", ".join(t for _, t in sorted(scored)[:8])
    return words


def test_the_stores_words_are_c_tf_idf_against_the_reference_counted_in_plain_python(tmp_path):
    """cell_words equals a plain count of the term files, with a reference of some of the files
    (word counts past a power of two) and of all of them."""
    from hermes.store import create_views
    from hermes.terms import create_cell_terms

    files = _term_files(tmp_path)
    partial = []
    for k in (1, 4, 8):
        con = duckdb.connect(str(tmp_path / f"s{k}.duckdb"))
        con.execute("CREATE TABLE labels AS SELECT 'd' || i AS doc_id, 300 AS n_chars, 50 AS n_tokens, "
                    "0.5 AS quality, 0 AS c1, 0 AS c2, 0 AS c3 FROM range(3) t(i)")
        create_views(con)
        create_cell_terms(con, files[:k])
        got = {(level, *(c for c in (c1, c2, c3)[:level])): w
               for level, c1, c2, c3, w in con.execute("SELECT level, c1, c2, c3, words FROM cell_words").fetchall()}
        ref_files = con.execute("SELECT ref_files FROM word_reference").fetchall()[0][0]
        con.close()
        partial.append(ref_files < k)
        assert got == _plain_words(files[:k]), k
    assert partial[0] is False and any(partial)     # a reference of every file, and of the first files


def test_an_append_ranks_the_words_of_the_cells_it_touches_as_a_build_does(tmp_path):
    """Term files added one at a time give, after each, the words, counts and reference of a store
    built from the same files at once: appends within a power of two of word-count rows (ranking
    only the touched cells' kept and counted terms; new term ids out of term order, ties by term;
    a cell's top count from an earlier file) and appends that pass one (the reference taken again)."""
    from hermes.store import create_views
    from hermes.terms import create_cell_terms, update_cell_terms

    files = _term_files(tmp_path)

    def store(name, term_files):
        con = duckdb.connect(str(tmp_path / name))
        con.execute("CREATE TABLE labels AS SELECT 'd' || i AS doc_id, 300 AS n_chars, 50 AS n_tokens, 0.5 AS quality, "
                    "CAST(i % 3 AS SMALLINT) AS c1, CAST(i // 3 % 3 AS SMALLINT) AS c2, CAST(i // 9 % 4 AS SMALLINT) AS c3 "
                    "FROM range(36) t(i)")
        create_views(con)
        create_cell_terms(con, term_files)
        return con

    kept = retaken = 0
    for first in (1, 3):
        grown = store(f"grown{first}.duckdb", files[:first])
        for k in range(first, len(files)):
            before = grown.execute("SELECT ref_files, ref_rows FROM word_reference").fetchall()
            update_cell_terms(grown, files[:k + 1], new=1)
            same = grown.execute("SELECT ref_files, ref_rows FROM word_reference").fetchall() == before
            kept, retaken = kept + same, retaken + (not same)
            whole = store(f"whole{first}-{k}.duckdb", files[:k + 1])
            expected = _word_rows(whole)
            whole.close()
            assert _word_rows(grown) == expected, (first, k, same)
    assert kept >= 4 and retaken >= 2
    assert any(len(w.split(", ")) == 8 for *_, w, _r, _n, _t in expected["cell_words"])    # more terms than kept
    # words of another layout (another TERMS_PER_CELL, say) are scored again in full by an append
    old = store("other-layout.duckdb", files[:6])
    old.execute("UPDATE word_reference SET layout = 'earlier'")
    old.execute("DELETE FROM word_top_l123")                  # what an append within the layout would rank from
    update_cell_terms(old, files[:7], new=1)
    whole = store("whole-7.duckdb", files[:7])
    assert _word_rows(old) == _word_rows(whole)
