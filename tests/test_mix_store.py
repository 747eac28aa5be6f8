"""Mixing against a real store: folders, diagnostics, compare, and misuse (nothing written)."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from hermes import api
from tests.conftest import invoke


def test_mix_writes_the_mixture_folder(e2e, tmp_path):
    out = tmp_path / "mix"
    r = invoke("mix", "--db", e2e["db"], "--rule", "uniform", "--to-level", "2", "--eligible", "top:0.5",
               "--budget-tokens", "50000", "--seed", "3", "--out", out, "--format", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["substrate"] == e2e["summary"]["substrate"] and d["spec"]["to_level"] == 2
    weights = pq.read_table(out / "weights.parquet").to_pylist()
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sum(w["weight"] for w in weights) == pytest.approx(1.0)
    assert all(w["cell"].count(".") == 1 and w["parent"] == w["cell"].split(".")[0] for w in weights)
    con = duckdb.connect(str(e2e["db"]), read_only=True)
    labels = {row[0]: row[1:] for row in con.execute("SELECT doc_id, n_tokens, quality, c1, c2 FROM labels").fetchall()}
    con.close()
    thresholds = {w["cell"]: w["quality_threshold"] for w in weights}
    for m in manifest:
        n_tokens, quality, c1, c2 = labels[m["doc_id"]]
        assert m["repeats"] >= 1 and m["n_tokens"] == n_tokens and m["cell"] == f"{c1}.{c2}"
        assert quality >= thresholds[m["cell"]] - 1e-12
    selected = sum(m["repeats"] * m["n_tokens"] for m in manifest)
    assert selected == d["diagnostics"]["selected_tokens"]
    assert json.loads((out / "mixture.json").read_text())["diagnostics"] == d["diagnostics"]


def test_same_seed_same_manifest(e2e, tmp_path):
    for name in ("a", "b"):
        api.mix(e2e["db"], tmp_path / name, rule="temperature:2", to_level=3, sampler="equal", seed=7)
    assert pq.read_table(tmp_path / "a" / "manifest.parquet").equals(pq.read_table(tmp_path / "b" / "manifest.parquet"))


def test_compare_grid_shows_pools_shrinking_with_the_level(e2e, tmp_path):
    r = invoke("compare", "--db", e2e["db"], "--levels", "1,2,3", "--rules", "natural,uniform",
               "--samplers", "proportional,equal", "--eligible", "all,top:0.3", "--format", "json",
               "--out", tmp_path / "grid")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert len(res["mixtures"]) == 3 * 2 * 2 * 2
    assert len(res["pairs"]) == 24 * 23 // 2
    for rule in ("natural", "uniform"):
        pools = [next(m["pool_median"] for m in res["mixtures"] if m["to_level"] == lv and m["rule"] == rule
                      and m["sampler"] == "proportional" and m["eligible"] == "top:0.3") for lv in (1, 2, 3)]
        assert pools[0] > pools[1] >= pools[2]
    natural = next(m for m in res["mixtures"] if m["rule"] == "natural" and m["eligible"] == "all" and m["to_level"] == 1)
    assert natural["tv_L1"] == pytest.approx(0, abs=0.02)
    assert len(list((tmp_path / "grid").glob("*/mixture.json"))) == 24
    for fmt in ("table", "csv"):
        r = invoke("compare", "--db", e2e["db"], "--levels", "1", "--rules", "natural", "--samplers", "equal",
                   "--format", fmt)
        assert r.exit_code == 0 and "pool_median" in r.stdout


def test_weights_file_rule(e2e, tmp_path):
    cells = api.cells(e2e["db"], 1).to_pylist()
    wfile = tmp_path / "w.csv"
    wfile.write_text("cell,weight\n" + "\n".join(f"{c['cell']},{i + 1}" for i, c in enumerate(cells[:-1])) + "\n")
    d = api.mix(e2e["db"], tmp_path / "m", rule=f"weights:{wfile}")
    assert any("not in the" in w and "get weight 0" in w for w in d["warnings"])
    w = pq.read_table(tmp_path / "m" / "weights.parquet").to_pylist()
    assert w[-1]["weight"] == 0 and w[1]["weight"] == pytest.approx(2 * w[0]["weight"])


@pytest.mark.parametrize("args, code, message", [
    (["--rule", "zipf"], 1, "unknown rule 'zipf' (hint: valid rules: natural, uniform"),
    (["--sampler", "greedy"], 1, "valid samplers: proportional, equal"),
    (["--level", "4"], 1, "--level 4 is not a level"),
    (["--level", "2", "--to-level", "1"], 1, "--to-level 1 is below --level 2"),
    (["--eligible", "top:1.5"], 1, "P must be in (0, 1]"),
    (["--budget-tokens", "0"], 1, "must be positive"),
    (["--budget-tokens", "ten"], 2, "Invalid value for '--budget-tokens'"),
    (["--budget-tokens", "100000000", "--max-epochs", "2"], 1, "the largest feasible budget is"),
])
def test_mix_misuse(e2e, tmp_path, args, code, message):
    out = tmp_path / "mix"
    r = invoke("mix", "--db", e2e["db"], "--out", out, *args)
    assert r.exit_code == code, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ("cell,weight\n9999,1\n", "w.csv:2: cell '9999' is not an L1 cell"),
    ("cell,weight\n0,-1\n", "w.csv:2: weight of cell 0 is -1"),
    ("cell,w\n0,1\n", "w.csv:1: the header must name the columns cell and weight"),
])
def test_bad_weights_files(e2e, tmp_path, content, message):
    wfile = tmp_path / "w.csv"
    wfile.write_text(content)
    r = invoke("mix", "--db", e2e["db"], "--out", tmp_path / "m", "--rule", f"weights:{wfile}")
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()


def _altered_store(e2e, path, sql: str):
    """A copy of the e2e store with one UPDATE applied."""
    shutil.copy(e2e["db"], path)
    con = duckdb.connect(str(path))
    con.execute(sql)
    con.close()
    return path


def test_store_mixing_two_substrates_is_refused(e2e, tmp_path):
    db = _altered_store(e2e, tmp_path / "mixed.duckdb", "UPDATE labels SET substrate = 'other' WHERE rowid < 10")
    r = invoke("mix", "--db", db, "--out", tmp_path / "m")
    assert r.exit_code == 1 and "mixes labels of 2 substrates" in r.stderr
    assert not (tmp_path / "m").exists()


def test_top_p_on_a_store_without_quality_is_refused(e2e, tmp_path):
    db = _altered_store(e2e, tmp_path / "noq.duckdb", "UPDATE labels SET quality = NULL")
    r = invoke("mix", "--db", db, "--out", tmp_path / "m", "--eligible", "top:0.3")
    assert r.exit_code == 1 and "needs quality scores" in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("spec", [dict(rule="natural", to_level=1), dict(rule="natural", to_level=2),
                                  dict(rule="uniform", to_level=2, eligible="top:0.3")])
def test_budgets_are_met_on_a_real_store_over_seeds(e2e, spec):
    """20 seeds on the labels of a real run: the total within 1% of the budget (or one document),
    every level-M cell within one of its documents of its target. (Natural shares at L1 are
    checked where the budget holds 50 documents per L1 cell: tests/test_mixers.py.)"""
    from hermes.mixers import MixSpec, make_mixture
    from hermes.mixture import load_docs

    docs, _ = load_docs(e2e["db"])
    budget = int(docs.n_tokens.sum() * 0.3)
    m = spec["to_level"]
    keys = docs.keys(m)
    for seed in range(20):
        mix = make_mixture(docs, MixSpec(budget_tokens=budget, seed=seed, **spec))
        c = mix.cells
        got = c["selected_tokens"]
        assert abs(got.sum() - budget) <= max(0.01 * budget, docs.n_tokens.max())
        biggest = np.array([docs.n_tokens[keys == k].max() for k in c["key"]])
        assert np.all(np.abs(got - c["target_tokens"]) <= biggest)


def test_quickstart_mixture_on_the_bundled_sample_has_usable_pools(tmp_path):
    """The size rule on the whole bundled sample (3,000 documents; a short window to keep it quick):
    the README's `--to-level 2 --eligible top:0.3` mixture draws from real pools, not single documents."""
    r = invoke("run", "--out", tmp_path / "out", "--max-length", "32", "--quiet", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["codebook_sizes"] == [4, 5, 75]
    r = invoke("mix", "--db", tmp_path / "out" / "labels.duckdb", "--rule", "uniform", "--to-level", "2",
               "--eligible", "top:0.3", "--out", tmp_path / "mix-u-l12", "--format", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["diagnostics"]["pool"]["median_eligible_docs"] >= 10
    assert not any("small candidate pools" in w for w in d["warnings"])


def test_compare_with_a_weights_file_writes_one_folder_per_mixture(e2e, tmp_path):
    cells = api.cells(e2e["db"], 1).to_pylist()
    wfile = tmp_path / "deep" / "er" / "w.csv"
    wfile.parent.mkdir(parents=True)
    wfile.write_text("cell,weight\n" + "\n".join(f"{c['cell']},1" for c in cells) + "\n")
    api.compare(e2e["db"], levels=[1], rules=["natural", f"weights:{wfile}"], samplers=["proportional"],
                eligible=["all"], out=tmp_path / "cmp")
    folders = sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir())
    assert folders == ["L1-natural-to-L1-proportional-all", "L1-weights-w-to-L1-proportional-all"]
    assert (tmp_path / "cmp" / folders[1] / "mixture.json").is_file()


def test_compare_names_the_levels_option_for_a_bad_level(e2e, tmp_path):
    r = invoke("compare", "--db", e2e["db"], "--levels", "1,4", "--out", tmp_path / "cmp")
    assert r.exit_code == 1 and "--levels 4 is not a level" in r.stderr, r.output
    assert not (tmp_path / "cmp").exists()
