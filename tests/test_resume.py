"""Killed with SIGKILL at several points, a rerun of the same command gives the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from tests.conftest import invoke, write_jsonl

N_SHARDS = 6


def corpus(root: Path, records: list[dict]) -> Path:
    per = len(records) // N_SHARDS
    for i in range(N_SHARDS):
        write_jsonl(root / "corpus" / f"part-{i}.jsonl", records[i * per:(i + 1) * per])
    return root / "corpus"


def labels(db: Path) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT doc_id, c1, c2, c3, n_tokens, quality, substrate FROM labels ORDER BY doc_id").fetchall()
    con.close()
    return rows


def kill_after(args: list[str], out: Path, done_shards: int, timeout: float = 240) -> None:
    """Start `hermes ARGS`, SIGKILL it once `done_shards` label markers exist."""
    kill_when(args, lambda: len(list((out / "labels" / "_done").glob("*.json"))) >= done_shards, timeout)


def kill_when(args: list[str], ready, timeout: float = 240) -> None:
    """Start `hermes ARGS`, SIGKILL it once `ready()` is true."""
    proc = subprocess.Popen([sys.executable, "-m", "hermes", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_label_survives_sigkill_and_resumes(e2e, tmp_path):
    src = corpus(tmp_path, e2e["records"])
    substrate = e2e["out"] / "substrate"
    whole = tmp_path / "whole"
    assert invoke("label", src, "--substrate", substrate, "--out", whole, "--quiet").exit_code == 0
    expected = labels(whole / "labels.duckdb")
    assert len(expected) == len({r[0] for r in expected}) == N_SHARDS * (len(e2e["records"]) // N_SHARDS)

    out = tmp_path / "killed"
    args = ["label", str(src), "--substrate", str(substrate), "--out", str(out), "--quiet"]
    for done in (1, 3, 5):
        kill_after(args, out, done)
        assert not (out / "labels.duckdb").exists()      # never a half-made store
    finished_before = {p.name for p in (out / "labels" / "_done").glob("*.json")}
    assert len(finished_before) >= 3
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert labels(out / "labels.duckdb") == expected
    log = (out / "run.log").read_text().splitlines()
    skipped = [line for line in log if '"skipped": true' in line]
    assert len(skipped) >= len(finished_before)          # the rerun did only the missing shards



def test_run_survives_sigkill_and_resumes(e2e, tmp_path):
    """`hermes run` killed while embedding, and again while labeling: the rerun gives the labels of an
    uninterrupted run, and leaves no temporary file behind."""
    src = corpus(tmp_path, e2e["records"][:180])
    common = ["--encoder", "transformer", "--max-length", "32", "--codebook-sizes", "3,2,2", "--quiet"]
    whole = tmp_path / "whole"
    assert invoke("run", src, "--out", whole, *common).exit_code == 0
    expected = labels(whole / "labels.duckdb")

    out = tmp_path / "killed"
    args = ["run", str(src), "--out", str(out), *common]
    kill_when(args, lambda: len(list((out / "embeddings").glob("*.done.json"))) >= 2)
    assert not (out / "labels.duckdb").exists()         # killed while embedding: no store, and no half of one
    kill_when(args, lambda: len(list((out / "labels" / "_done").glob("*.json"))) >= 1)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert labels(out / "labels.duckdb") == expected
    assert not [p for p in out.rglob("*.tmp")]
