"""The Ray engine (local mode) writes the same label files as the local engine."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import invoke, write_jsonl

ray = pytest.importorskip("ray")


def test_ray_and_local_engines_give_identical_label_files(e2e, tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / "corpus" / f"p{i}.jsonl", e2e["records"][i * 30:(i + 1) * 30])
    substrate = e2e["out"] / "substrate"
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        r = invoke("label", tmp_path / "corpus", "--substrate", substrate, "--out", out, "--engine", engine, "--quiet")
        assert r.exit_code == 0, r.output
        outs[engine] = out
    local_files = sorted(p.name for p in (outs["local"] / "labels").glob("*.parquet"))
    assert local_files == sorted(p.name for p in (outs["ray"] / "labels").glob("*.parquet")) and len(local_files) == 3
    for name in local_files:
        a = pq.read_table(outs["local"] / "labels" / name)
        b = pq.read_table(outs["ray"] / "labels" / name)
        assert a.equals(b), name
    ray.shutdown()
