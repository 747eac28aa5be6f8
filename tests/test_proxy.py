"""The proxy loop: spread-out candidates, a regression with held-out error, a usable weights file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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

    # a known loss surface the proxy model can represent: each cell's own loss, mixed linearly
    # (plus noise). A distance to a target mixture is quadratic in the weights: a linear model's
    # held-out ranking of it then depends on the candidates drawn, so on the store's cells
    rng = np.random.default_rng(0)
    per_cell = rng.uniform(1.0, 3.0, len(cells))
    def true_loss(w):
        return float(np.array([w[c] for c in cells]) @ per_cell)
    with open(tmp_path / "proxy" / "losses.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["candidate", "loss"])
        for c, w in zip(meta["candidates"], cands):
            wr.writerow([c["candidate"], true_loss(w) + rng.normal(0, 1e-4)])
    r = invoke("optimize", "--candidates", tmp_path / "proxy", "--losses", tmp_path / "proxy" / "losses.csv",
               "--out", tmp_path / "best.csv", "--format", "json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["held_out"]["folds"] == 5
    assert rep["held_out"]["spearman"] > 0.9             # the held-out predictions rank the known surface
    best = read_weights(tmp_path / "best.csv")
    assert true_loss(best) < np.median([true_loss(w) for w in cands])
    # the weights file is accepted by the weights:FILE rule
    d = api.mix(e2e["db"], tmp_path / "m", rule=f"weights:{tmp_path / 'best.csv'}")
    assert d["diagnostics"]["selected_tokens"] > 0


@pytest.mark.parametrize("content, message", [
    ("candidate,loss\ncand-000,1\n", "needs at least 5"),
    ("candidate,loss\nnope,1\n", "losses.csv:2: unknown candidate 'nope'"),
    ("candidate,loss\ncand-000,abc\n", "losses.csv:2: 'abc' is not a number (column 'loss')"),
    ("name,value\n", "losses.csv:1: the header must name the columns candidate and loss"),
])
def test_bad_losses(e2e, tmp_path, content, message):
    api.propose(e2e["db"], tmp_path / "p", n=6)
    (tmp_path / "p" / "losses.csv").write_text(content)
    r = invoke("optimize", "--candidates", tmp_path / "p", "--losses", tmp_path / "p" / "losses.csv",
               "--out", tmp_path / "best.csv")
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "best.csv").exists()


# --------------------------------------------------------------------------- published proxy runs (RegMix)

REGMIX = Path(__file__).parent / "data" / "regmix"
TARGET = "metric/the_pile_pile_cc_val_loss"


def regmix_args(tmp_path, model):
    return ["optimize", "--weights", REGMIX / "train_mixture_1m.csv", "--losses", REGMIX / "train_pile_loss_1m.csv",
            "--target", TARGET, "--model", model, "--rank", REGMIX / "test_mixture_60m.csv",
            "--rank-losses", REGMIX / "test_pile_loss_60m.csv", "--rank-out", tmp_path / "ranked.csv",
            "--out", tmp_path / "best.csv", "--n-search", "20000"]


@pytest.mark.parametrize("model, floor", [("ridge", 0.85), ("gbm", 0.95)])
def test_optimize_on_regmix_tables_ranks_the_60m_runs(tmp_path, model, floor):
    """Fitted on the 512 1M-parameter runs only, the model ranks the 256 60M-parameter runs."""
    r = invoke(*regmix_args(tmp_path, model), "--format", "json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n_losses"] == 512 and rep["search_center"] == "mean of the runs"
    assert rep["rank"]["held_out"]["spearman"] >= floor
    with open(tmp_path / "ranked.csv", newline="") as f:
        ranked = list(csv.DictReader(f))
    pred = [float(x["predicted_loss"]) for x in ranked]
    assert len(ranked) == 256 and pred == sorted(pred)          # every planned mixture, best first
    assert ranked[0]["run"] == rep["rank"]["best_predicted"]["run"]
    best = read_weights(tmp_path / "best.csv")
    assert len(best) == 17 and all(k.startswith("train_the_pile_") for k in best)
    assert sum(best.values()) == pytest.approx(1.0)
    assert json.loads((tmp_path / "best.json").read_text())["rank"]["runs"] == 256


def test_optimize_tables_with_a_named_run_column(tmp_path):
    """--run-column names the join key wherever it is, in all four tables; rows in another order join."""
    def id_last(lines, n):
        return [",".join(row.split(",")[1:] + [row.split(",")[0].replace("index", "run")]) for row in lines[:n]]

    w = (REGMIX / "train_mixture_1m.csv").read_text().splitlines()
    l = (REGMIX / "train_pile_loss_1m.csv").read_text().splitlines()
    (tmp_path / "w.csv").write_text("\n".join(id_last(w, 60)) + "\n")
    (tmp_path / "l.csv").write_text("\n".join([id_last(l, 1)[0]] + id_last(l[1:60][::-1], 59)) + "\n")
    tw = (REGMIX / "test_mixture_60m.csv").read_text().splitlines()
    tl = (REGMIX / "test_pile_loss_60m.csv").read_text().splitlines()
    (tmp_path / "tw.csv").write_text("\n".join(id_last(tw, 40)) + "\n")
    (tmp_path / "tl.csv").write_text("\n".join(id_last(tl, 40)) + "\n")
    rep = api.optimize(None, tmp_path / "l.csv", tmp_path / "best.csv", weights=tmp_path / "w.csv", target=TARGET,
                       run_column="run", n_search=2000, rank=tmp_path / "tw.csv", rank_out=tmp_path / "r.csv",
                       rank_losses=tmp_path / "tl.csv")
    col = l[0].split(",").index(TARGET)
    losses = {row.split(",")[0]: float(row.split(",")[col]) for row in l[1:60]}
    best = min(losses, key=losses.get)
    assert rep["n_losses"] == 59 and rep["best_measured"] == {"run": best, "loss": losses[best]}
    assert rep["rank"]["runs"] == 39 and rep["rank"]["held_out"]["spearman"] is not None


def _table(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


W3 = "index,a,b\n1,0.5,0.5\n2,0.2,0.8\n3,1,0\n4,0,1\n5,0.3,0.7\n"
L3 = "index,loss,other\n1,3.0,1\n2,2.5,1\n3,4.0,1\n4,2.0,1\n5,2.6,1\n"


@pytest.mark.parametrize("weights, losses, extra, message", [
    (W3, L3.replace("5,2.6", "9,2.6"), [], "l.csv:6: run '9' is not in"),
    (W3, L3.replace("5,2.6,1\n", ""), [], "l.csv: no loss for run '5' of"),
    (W3, L3.replace("2,2.5", "2,nan"), [], "l.csv:3: nan is not finite (column 'loss')"),
    (W3, L3.replace("2,2.5", "2,inf"), [], "l.csv:3: inf is not finite (column 'loss')"),
    (W3, L3.replace("2,2.5", "2,x"), [], "l.csv:3: 'x' is not a number (column 'loss')"),
    (W3, L3.replace("loss", "los"), [], "l.csv:1: no column 'loss' (--target)"),
    (W3.replace("3,1,0", "3,-1,0"), L3, [], "w.csv:4: weight -1 is negative (column 'a')"),
    (W3.replace("3,1,0", "3,0,0"), L3, [], "w.csv:4: every weight of run '3' is 0"),
    (W3.replace("4,0,1", "2,0,1"), L3, [], "w.csv:5: run '2' also on line 3"),
    (W3, L3, ["--run-column", "id"], "w.csv:1: no column 'id' (the run id)"),
    (W3, L3, ["--rank", "RANK", "--rank-out", "R"], "m.csv:1: no column 'b'"),
    (W3.replace("index,a,b", "index,a,a"), L3, [], "w.csv:1: column 'a' appears more than once"),
])
def test_bad_loss_tables(tmp_path, weights, losses, extra, message):
    w, l = _table(tmp_path, "w.csv", weights), _table(tmp_path, "l.csv", losses)
    m = _table(tmp_path, "m.csv", "index,a,c\n1,0.5,0.5\n")
    extra = [str(m) if x == "RANK" else str(tmp_path / "r.csv") if x == "R" else x for x in extra]
    r = invoke("optimize", "--weights", w, "--losses", l, "--target", "loss", "--out", tmp_path / "best.csv", *extra)
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "best.csv").exists() and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("args, message", [
    ([], "give either --candidates DIR"),
    (["--weights", "W"], "--weights needs --target"),
    (["--weights", "W", "--target", "loss", "--rank", "W"], "--rank and --rank-out go together"),
])
def test_optimize_flag_errors(tmp_path, args, message):
    w = _table(tmp_path, "w.csv", W3)
    l = _table(tmp_path, "l.csv", L3)
    args = [str(w) if a == "W" else a for a in args]
    r = invoke("optimize", "--losses", l, "--out", tmp_path / "best.csv", *args)
    assert r.exit_code == 1 and message in r.stderr, r.stderr
