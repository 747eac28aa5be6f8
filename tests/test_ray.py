"""The Ray engine (Ray Data on this machine) gives the same outputs as the local engine, for
`hermes label` and for `hermes run`, on a corpus whose large file is cut into several shards."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from hermes.engines import collect
from hermes.read import Shard
from tests.conftest import FAST, invoke, write_jsonl

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def split_corpus(e2e, tmp_path_factory):
    """Three files, one of them large enough to be cut into row ranges (shard_bytes 20 kB)."""
    root = tmp_path_factory.mktemp("split")
    write_jsonl(root / "corpus" / "big.jsonl", e2e["records"][:120])
    for i in range(2):
        write_jsonl(root / "corpus" / f"p{i}.jsonl", e2e["records"][120 + i * 20:140 + i * 20])
    (root / "small-shards.yaml").write_text("shard_bytes: 20000\n")
    return root


def label_files(out):
    return {p.name: pq.read_table(p) for p in sorted((out / "labels").glob("*.parquet"))}


def assert_same_labels(a, b):
    files_a, files_b = label_files(a), label_files(b)
    assert sorted(files_a) == sorted(files_b) and len(files_a) > 3          # the big file is in parts
    for name in files_a:
        assert files_a[name].equals(files_b[name]), name


def test_label_on_ray_equals_local(e2e, split_corpus, tmp_path):
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        r = invoke("label", split_corpus / "corpus", "--substrate", e2e["out"] / "substrate", "--out", out,
                   "--config", split_corpus / "small-shards.yaml", "--engine", engine, "--quiet", "--format", "json")
        assert r.exit_code == 0, r.output
        outs[engine] = json.loads(r.stdout)
        assert outs[engine]["labeled"] == 160
    assert outs["local"]["shards"] == outs["ray"]["shards"] > 3
    assert_same_labels(tmp_path / "local", tmp_path / "ray")


def test_run_on_ray_equals_local(split_corpus, tmp_path):
    ray.shutdown()
    summaries = {}
    for engine in ("local", "ray"):
        r = invoke("run", split_corpus / "corpus", "--out", tmp_path / engine, "--config",
                   split_corpus / "small-shards.yaml", "--engine", engine, "--codebook-sizes", "3,2,2", "--format",
                   "json", *FAST)
        assert r.exit_code == 0, r.output
        assert ray.is_initialized() == (engine == "ray")        # the local run does not touch Ray
        summaries[engine] = json.loads(r.stdout)
    assert summaries["local"]["substrate"] == summaries["ray"]["substrate"]      # the same fit on the same vectors
    assert summaries["local"]["cells"] == summaries["ray"]["cells"]
    assert_same_labels(tmp_path / "local", tmp_path / "ray")
    ray.shutdown()


def test_results_are_matched_by_shard_key_not_name():
    parts = [Shard(path="/c/big.jsonl", name="big.jsonl", fmt="jsonl", start=i, end=i + 10) for i in (0, 10)]
    assert parts[0].key != parts[1].key
    rows = [{"shard": json.dumps(s.__dict__), "docs": n, "rejects": 0, "skipped": False}
            for s, n in zip(parts[::-1], (7, 3))]
    assert [r.n_docs for r in collect(parts, rows)] == [3, 7]


def _ray_workers() -> list[int]:
    """Process ids of this machine's hermes Ray workers (their process title names the actor)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"_RayWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_a_worker_killed_mid_shard_is_replaced_and_the_shard_redone(e2e, split_corpus, tmp_path):
    """SIGKILL to the Ray worker while a shard is half-embedded: Ray starts another, the shard is
    done again from the start, and the labels equal the local engine's (no half-written file)."""
    import os
    import signal
    import threading
    import time

    ray.shutdown()
    args = [split_corpus / "corpus", "--substrate", e2e["out"] / "substrate", "--config",
            split_corpus / "small-shards.yaml", "--quiet", "--format", "json"]
    assert invoke("label", *args, "--out", tmp_path / "local").exit_code == 0
    out = tmp_path / "ray"
    result = {}
    labeling = threading.Thread(target=lambda: result.update(r=invoke("label", *args, "--out", out, "--engine", "ray")))
    labeling.start()
    killed, deadline = None, time.time() + 300
    while killed is None and labeling.is_alive() and time.time() < deadline:
        half = list((out / "embeddings").glob("*.tmp")) if (out / "embeddings").is_dir() else []
        workers = _ray_workers()
        if half and workers:
            os.kill(workers[0], signal.SIGKILL)
            killed = workers[0]
        time.sleep(0.02)
    labeling.join(600)
    assert killed is not None, "no shard was seen half-embedded"
    r = result["r"]
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["labeled"] == 160
    assert killed not in _ray_workers()
    assert_same_labels(tmp_path / "local", out)
    ray.shutdown()
