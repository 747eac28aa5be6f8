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


def _processes_of(*markers: str, descendants: bool = True) -> list[int]:
    """Process ids whose command line holds one of `markers` (and all their descendants)."""
    from pathlib import Path

    parents, found = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if any(m.encode() in cmdline for m in markers):
                found.add(int(proc.name))
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    grew = descendants
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return sorted(found)


def _ray_workers() -> list[int]:
    """Process ids of this machine's hermes Ray workers (their process title names the actor)."""
    return _processes_of("_RayWorker", descendants=False)


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


# A worker node of a cluster on this machine's loopback: Ray 2.60 replaces 127.0.0.1 in `ray start
# --address` by the machine's other address (ray-project/ray#59110), where the head does not
# listen. The node is started by `ray start` itself, with that one replacement undone.
_LOOPBACK_NODE = """
import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", "start", *sys.argv[1:]]
main()
"""


@pytest.fixture
def two_node_cluster():
    """A real Ray cluster of two nodes on 127.0.0.1 (`ray start --head`, then a second `ray start
    --address`), stopped by the process ids of what it started."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="hr", dir="/tmp")          # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # on this machine's loopback only: a head at 127.0.0.1 keeps its node address (and listens there)
    local = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    common = ["--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}"]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    try:
        subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--include-dashboard=false", *common], env=local, check=True, capture_output=True, timeout=120)
        subprocess.run([sys.executable, "-c", _LOOPBACK_NODE, f"--address=127.0.0.1:{port}", *common], env=env,
                       check=True, capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "env": local, "ray": ray_cli}
    finally:
        # what the cluster started names its folder or its address (Ray's client proxy), and what
        # those start descends from them; again until none is left (a raylet may start more)
        deadline = time.time() + 60
        while time.time() < deadline:
            pids = _processes_of(temp, f"127.0.0.1:{port}")
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_label_on_a_two_node_cluster_equals_local(e2e, split_corpus, tmp_path, two_node_cluster):
    """`hermes label --engine ray --address` against a real cluster of two nodes on 127.0.0.1:
    workers on both nodes write the label files to the shared output folder, the labels equal
    the local engine's; then the cluster is stopped."""
    import subprocess
    import sys
    import time

    def active_nodes() -> tuple[int, str]:
        status = subprocess.run([two_node_cluster["ray"], "status", f"--address={two_node_cluster['address']}"],
                                env=two_node_cluster["env"], capture_output=True, text=True, timeout=60).stdout
        return status.split("Active:")[-1].split("Pending:")[0].count(" node_") if "Active:" in status else 0, status

    deadline = time.time() + 120
    n, status = active_nodes()
    while n < 2 and time.time() < deadline:     # the autoscaler reports a node a few seconds after it starts
        time.sleep(1)
        n, status = active_nodes()
    assert n == 2, status          # two alive nodes
    args = [split_corpus / "corpus", "--substrate", e2e["out"] / "substrate", "--config",
            split_corpus / "small-shards.yaml", "--quiet", "--format", "json"]
    assert invoke("label", *args, "--out", tmp_path / "local").exit_code == 0
    r = subprocess.run([sys.executable, "-m", "hermes", "label", *map(str, args), "--out", str(tmp_path / "ray"),
                        "--engine", "ray", "--address", two_node_cluster["address"]],
                       env=two_node_cluster["env"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["labeled"] == 160
    assert_same_labels(tmp_path / "local", tmp_path / "ray")
    log = [json.loads(line) for line in (tmp_path / "ray" / "run.log").read_text().splitlines()]
    assert len({e.get("node") for e in log if not e["skipped"]}) == 2, log      # both nodes worked
    # `hermes run` on the cluster: the same fit and labels as on this process
    common = [split_corpus / "corpus", "--config", split_corpus / "small-shards.yaml", "--codebook-sizes", "3,2,2",
              "--format", "json", *FAST]
    assert invoke("run", *common, "--out", tmp_path / "run-local").exit_code == 0
    r = subprocess.run([sys.executable, "-m", "hermes", "run", *map(str, common), "--out", str(tmp_path / "run-ray"),
                        "--engine", "ray", "--address", two_node_cluster["address"]],
                       env=two_node_cluster["env"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    local = json.loads((tmp_path / "run-local" / "substrate" / "manifest.json").read_text())["fingerprint"]
    assert json.loads(r.stdout)["substrate"] == local
    assert_same_labels(tmp_path / "run-local", tmp_path / "run-ray")
