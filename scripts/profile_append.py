"""Profile one append of 1% more rows to a synthetic store, statement by statement.

Builds the store of `bench_store.py` once in --workdir (kept, so later runs reuse it), then appends a
new file of N/100 rows to a copy of it, timing every SQL statement the append runs. Prints JSON:
`append_seconds` and the statements that took longest (`seconds`, the statement's first 120
characters, summed over repeats). Run it twice, with the code before and after a change, to compare
(`PYTHONPATH=<other checkout> python scripts/profile_append.py ...` from outside the repository);
a kept store without table doc_keys (built by older code) is built again.

    python scripts/profile_append.py --rows 30000000 --workdir /tmp/profile-append
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_store import SHARD_ROWS, manifest, write_labels  # noqa: E402


class _Timed:
    """A DuckDB connection that adds up the seconds of each statement it executes."""

    def __init__(self, con, spent: collections.Counter):
        self._con, self._spent = con, spent

    def execute(self, sql, *args):
        t = time.perf_counter()
        self._con.execute(sql, *args)
        self._spent[re.sub(r"\s+", " ", str(sql).strip())[:120]] += time.perf_counter() - t
        return self

    def __getattr__(self, name):
        return getattr(self._con, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hermes-profile-append"))
    ap.add_argument("--top", type=int, default=25, help="statements listed (default 25)")
    args = ap.parse_args()
    import duckdb

    from hermes.store import append_store, build_store

    labels, built = args.workdir / "labels", args.workdir / "built.duckdb"
    extra = labels / "appended.parquet"
    if built.is_file():         # a store built by code before table doc_keys would time their making
        con = duckdb.connect(str(built), read_only=True)
        keyed = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'doc_keys'").fetchall()[0][0]
        con.close()
        if not keyed:
            built.unlink()
    if not built.is_file():
        labels.mkdir(parents=True, exist_ok=True)
        files = []
        for k, first in enumerate(range(0, args.rows, SHARD_ROWS)):
            files.append(labels / f"shard-{k:05d}.parquet")
            write_labels(files[-1], first, min(SHARD_ROWS, args.rows - first), k)
        write_labels(extra, args.rows, max(1, args.rows // 100), len(files))
        build_store(built, [str(f) for f in files], [], manifest(), info={"command": "profile"}, term_files=[])
    db = args.workdir / "appending.duckdb"
    for path in args.workdir.glob("appending.duckdb*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.copy(built, db)
    os.sync()       # else the append's first fsync (its COMMIT) pays for writing the copy out
    spent: collections.Counter = collections.Counter()
    connect = duckdb.connect
    duckdb.connect = lambda *a, **k: _Timed(connect(*a, **k), spent)
    try:
        t = time.perf_counter()
        append_store(db, labels, [extra], [], manifest(), {"command": "profile append"}, [])
        seconds = time.perf_counter() - t
    finally:
        duckdb.connect = connect
    print(json.dumps({"rows": args.rows, "append_rows": max(1, args.rows // 100), "append_seconds": round(seconds, 2),
                      "statements": [{"seconds": round(v, 3), "sql": k} for k, v in spent.most_common(args.top)]},
                     indent=1))


if __name__ == "__main__":
    main()
