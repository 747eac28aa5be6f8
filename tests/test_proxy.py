"""The proxy loop: spread-out candidates, a regression with held-out error, a usable weights file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hermes import api
from tests.conftest import invoke


def read_weights(path):
    with open(path, newline="") as f:
        return {r["cell"]: float(r["weight"]) for r in csv.DictReader(f)}


def test_propose_then_optimize_finds_a_better_mixture(e2e, tmp_path):
    r = invoke("propose", "--db", e2e["db"], "--n", "24", "--out", tmp_path / "proxy", "--format", "json")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "proxy" / "candidates.json").read_text())
    cells = meta["cells"]
    cands = [read_weights(tmp_path / "proxy" / c["file"]) for c in meta["candidates"]]
    assert all(set(c) == set(cells) and sum(c.values()) == pytest.approx(1.0) for c in cands)
    tv = [c["tv_to_natural"] for c in meta["candidates"]]
    assert tv[0] == 0 and max(tv) > 0.3               # natural first, the others spread out

    # a known loss surface: distance to a target mixture, plus noise
    rng = np.random.default_rng(0)
    target = rng.dirichlet(np.ones(len(cells)))
    def true_loss(w):
        return float(np.sum((np.array([w[c] for c in cells]) - target) ** 2))
    with open(tmp_path / "proxy" / "losses.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["candidate", "loss"])
        for c, w in zip(meta["candidates"], cands):
            wr.writerow([c["candidate"], true_loss(w) + rng.normal(0, 1e-4)])
    r = invoke("optimize", "--candidates", tmp_path / "proxy", "--losses", tmp_path / "proxy" / "losses.csv",
               "--out", tmp_path / "best.csv", "--format", "json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["held_out"]["mae"] >= 0 and rep["held_out"]["folds"] == 5
    best = read_weights(tmp_path / "best.csv")
    assert true_loss(best) < np.median([true_loss(w) for w in cands])
    # the weights file is accepted by the weights:FILE rule
    d = api.mix(e2e["db"], tmp_path / "m", rule=f"weights:{tmp_path / 'best.csv'}")
    assert d["diagnostics"]["selected_tokens"] > 0


@pytest.mark.parametrize("content, message", [
    ("candidate,loss\ncand-000,1\n", "needs at least 5"),
    ("candidate,loss\nnope,1\n", "losses.csv:2: unknown candidate 'nope'"),
    ("candidate,loss\ncand-000,abc\n", "losses.csv:2: loss 'abc' is not a number"),
    ("name,value\n", "losses.csv:1: the header must name the columns candidate and loss"),
])
def test_bad_losses(e2e, tmp_path, content, message):
    api.propose(e2e["db"], tmp_path / "p", n=6)
    (tmp_path / "p" / "losses.csv").write_text(content)
    r = invoke("optimize", "--candidates", tmp_path / "p", "--losses", tmp_path / "p" / "losses.csv",
               "--out", tmp_path / "best.csv")
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "best.csv").exists()
