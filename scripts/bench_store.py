"""Benchmark the store at scale: building it from label files, appending 1% more, its views, and
one mixture, over synthetic label files of N rows.

Writes N label rows as Parquet label files (the files `hermes label` writes, 1M rows each) with a
realistic hierarchy (256 L1 cells with Zipf-like sizes, up to 256 children each, lognormal token
counts, uniform quality), then times, in one run:
- `build_seconds`: `store.build_store` over all of them (the store of `hermes run`/`label`);
- `append_seconds`: `store.append_store` of N/100 more rows in a new file (`hermes label
  --append`), and `append_share_of_build`;
- `view_seconds`: each granularity view, fully read (`SELECT * FROM cells_l1` ...; best of 3);
- `mix_seconds`, `mix_peak_rss_mb`: one mixture (`hermes mix` in a fresh process: uniform at L1,
  equal down to L12, top:0.3, budget = 10% of tokens), its wall time and peak RSS;
- `store_bytes` (labels.duckdb) and `label_file_bytes` (the Parquet label files, the source of truth);
- with `--words R`, synthetic term files too (R words drawn a document, counted per L123 cell and
  word), so that the build and the append score every cell's words (`cell_terms`) as `hermes
  label` does; `term_file_bytes` and `term_rows_per_doc`;
and, as the baseline in the same run, a plain DuckDB scan of the labels (`SELECT count(*),
sum(n_tokens) FROM labels`). Each step starts once what the steps before it wrote is on disk
(`os.sync`). Prints JSON.

    python scripts/bench_store.py --rows 10000000 --workdir /tmp/bench-store
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb


SHARD_ROWS = 1_000_000
FINGERPRINT = "synthetic0000000"


def write_labels(path: Path, first: int, rows: int, seed: int) -> None:
    """`rows` synthetic label rows (doc ids first .. first + rows - 1) as one label file."""
    con = duckdb.connect()
    con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
    # c1 Zipf-like over 256 cells, c2 and c3 skewed within; tokens lognormal; quality uniform
    con.execute(f"""
        COPY (
        SELECT 'doc-' || i AS doc_id, 'synthetic' AS source,
               CAST(n_tok * 4 AS INTEGER) AS n_chars, CAST(n_tok AS INTEGER) AS n_tokens,
               random() AS quality,
               CAST(floor(256 * pow(random(), 2.0)) AS SMALLINT) AS c1,
               CAST(floor(256 * pow(random(), 3.0)) AS SMALLINT) AS c2,
               CAST(floor(256 * pow(random(), 3.0)) AS SMALLINT) AS c3,
               '{FINGERPRINT}' AS substrate, '{path.stem}' AS file, i - {first} + 1 AS line, i - {first} AS seq
        FROM (SELECT i, greatest(1, exp(6 + 1.0 * sqrt(-2 * ln(random())) * cos(2 * pi() * random()))) AS n_tok
              FROM range({first}, {first + rows}) t(i))
        ) TO '{path}' (FORMAT parquet)""")
    con.close()


def write_terms(label_path: Path, path: Path, per_doc: int, seed: int) -> None:
    """A term file for one label file (the word counts per L123 cell that `hermes label` writes
    beside it): `per_doc` words drawn for each document, log-uniformly from 100,000 (Zipf-like),
    counted per cell and word (a word drawn twice in a cell is one row)."""
    con = duckdb.connect()
    con.execute(f"SELECT setseed({(seed % 1000) / 1000})")
    con.execute(f"""
        COPY (
        SELECT c1, c2, c3, term, CAST(count(*) AS BIGINT) AS count
        FROM (SELECT c1, c2, c3, 'w' || CAST(floor(exp(random() * ln(100000))) AS INTEGER) AS term
              FROM read_parquet('{label_path}'), range({per_doc}))
        GROUP BY c1, c2, c3, term
        ) TO '{path}' (FORMAT parquet)""")
    con.close()


def term_rows(paths: list[Path]) -> int:
    """How many rows the term files hold."""
    return duckdb.sql(f"SELECT count(*) FROM read_parquet({[str(p) for p in paths]!r})").fetchall()[0][0]


def manifest() -> dict:
    return {"fingerprint": FINGERPRINT, "created_at": "2026-01-01T00:00:00Z", "hermes_version": "bench",
            "embedding": {"model": "synthetic"}, "transform": {"kind": "none"}, "rvq": {}, "fit_sample_size": 0,
            "stages": None}


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def mix_in_process(db: Path, out: Path, budget: int) -> dict:
    """`hermes mix` in a fresh process: wall seconds and peak RSS (os.wait4)."""
    cmd = [sys.executable, "-m", "hermes", "mix", "--db", str(db), "--out", str(out), "--rule", "uniform",
           "--to-level", "2", "--sampler", "equal", "--eligible", "top:0.3", "--budget-tokens", str(budget),
           "--seed", "1", "--format", "json"]
    os.sync()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status):       # reported, and the rest of the bench goes on
        return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
                "error": f"exit {os.waitstatus_to_exitcode(status)}: {(stderr or '').strip()[-300:]}"}
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "summary": json.loads(stdout)}


def in_child(code: str) -> dict:
    """Run a Python snippet in a fresh process (it prints JSON): each step's memory is its own, and
    this process stays small, so the mixture's peak RSS is not inherited from the build (a forked
    child's maximum RSS starts at its parent's). What earlier steps wrote is on disk first, so that
    a step's first fsync does not pay for writing out another's files."""
    os.sync()
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r)\n" % str(Path(__file__).parent)
                          + code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench step failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hermes-bench-store"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--words", type=int, default=0,
                    help="words drawn per document into synthetic term files, counted per L123 cell and word "
                         "(the dev corpus's term files hold about 17 rows a document); "
                         "0 (default): no term files, so no words are scored")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    labels = args.workdir / "labels"
    labels.mkdir(parents=True)
    files = [labels / f"shard-{k:05d}.parquet" for k in range(-(-args.rows // SHARD_ROWS))]
    extra = labels / "appended.parquet"
    n_extra = max(1, args.rows // 100)
    in_child(f"""
import json
from pathlib import Path
from bench_store import write_labels
for k, first in enumerate(range(0, {args.rows}, {SHARD_ROWS})):
    write_labels(Path({str(labels)!r}) / f"shard-{{k:05d}}.parquet", first, min({SHARD_ROWS}, {args.rows} - first),
                 {args.seed} + k)
write_labels(Path({str(extra)!r}), {args.rows}, {n_extra}, {args.seed} + {len(files)})
print(json.dumps({{}}))""")
    terms = [args.workdir / "terms" / f.name for f in files + [extra]] if args.words else []
    if terms:
        terms[0].parent.mkdir()
        in_child(f"""
import json
from pathlib import Path
from bench_store import write_terms
for k, (f, t) in enumerate(zip({[str(f) for f in files + [extra]]!r}, {[str(t) for t in terms]!r})):
    write_terms(Path(f), Path(t), {args.words}, {args.seed} + k)
print(json.dumps({{}}))""")
    db = args.workdir / "labels.duckdb"
    build = in_child(f"""
import json, resource, time
from pathlib import Path
from bench_store import manifest
from hermes.store import build_store
t = time.perf_counter()
build_store(Path({str(db)!r}), {[str(f) for f in files]!r}, [], manifest(), info={{"command": "bench"}},
            term_files={[str(t) for t in terms[:-1]]!r})
print(json.dumps({{"seconds": time.perf_counter() - t,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))""")
    store_bytes = db.stat().st_size
    label_bytes = sum(f.stat().st_size for f in files)
    views = in_child(f"""
import json
import duckdb
from bench_store import timed
con = duckdb.connect({str(db)!r}, read_only=True)
out = {{"baseline": timed(lambda: con.execute("SELECT count(*), sum(n_tokens) FROM labels").fetchall())}}
for level in ("l1", "l12", "l123"):
    out[level] = timed(lambda: con.sql(f"SELECT * FROM cells_{{level}}").to_arrow_table())
    out["cells_" + level] = con.execute(f"SELECT count(*) FROM cells_{{level}}").fetchall()[0][0]
out["tokens"] = int(con.execute("SELECT sum(n_tokens) FROM labels").fetchall()[0][0])
print(json.dumps(out))""")
    mix = mix_in_process(db, args.workdir / "mixture", views["tokens"] // 10)
    append = in_child(f"""
import json, time
from pathlib import Path
from bench_store import manifest
from hermes.store import append_store
t = time.perf_counter()
append_store(Path({str(db)!r}), Path({str(labels)!r}), [Path({str(extra)!r})], [], manifest(),
             {{"command": "bench append"}}, [Path(t) for t in {[str(t) for t in terms]!r}])
print(json.dumps({{"seconds": time.perf_counter() - t}}))""")
    levels = ("l1", "l12", "l123")
    print(json.dumps({
        "rows": args.rows, "build_seconds": round(build["seconds"], 1), "build_peak_rss_mb": round(build["peak_rss_mb"]),
        "append_rows": n_extra, "append_seconds": round(append["seconds"], 2),
        "append_share_of_build": round(append["seconds"] / build["seconds"], 3),
        "view_seconds": {k: round(views[k], 3) for k in levels}, "cells": {k: views["cells_" + k] for k in levels},
        "baseline_scan_seconds": round(views["baseline"], 3),
        "mix_seconds": round(mix["seconds"], 1), "mix_peak_rss_mb": round(mix["peak_rss_mb"], 1),
        "mix": {"spec": "uniform L1 -> equal L12, top:0.3, budget 10% of tokens",
                **({"error": mix["error"]} if "error" in mix else
                   {"selected_tokens": mix["summary"]["diagnostics"]["selected_tokens"],
                    "budget_tokens": mix["summary"]["diagnostics"]["budget_tokens"]})},
        "store_bytes": store_bytes, "label_file_bytes": label_bytes,
        **({"words_per_doc": args.words, "term_file_bytes": sum(t.stat().st_size for t in terms[:-1]),
            "term_rows_per_doc": round(term_rows(terms[:-1]) / args.rows, 2)} if terms else {}),
        "store_bytes_per_million_docs": round(store_bytes / args.rows * 1e6),
        "label_file_bytes_per_million_docs": round(label_bytes / args.rows * 1e6),
    }, indent=2))


if __name__ == "__main__":
    main()
