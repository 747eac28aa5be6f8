"""Mixers as pure functions: property tests (hypothesis) and slow references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes.errors import HermesError
from hermes.mixers import (Docs, MixSpec, Rule, balanced_round, cap_epochs, make_mixture, parse_eligible,
                           parse_rule, stage1_weights, stage2_weights, unimax, within_cell_threshold)

RULE_TEXTS = ["natural", "uniform", "temperature:2", "temperature:0.5", "unimax:1", "unimax:4"]


def random_docs(seed: int, n: int = 400, k: int = 4, with_nulls: bool = False) -> Docs:
    rng = np.random.default_rng(seed)
    c = np.stack([rng.integers(0, k, n), rng.integers(0, k, n), rng.integers(0, k, n)], axis=1)
    quality = rng.random(n)
    if with_nulls:
        quality[rng.random(n) < 0.1] = np.nan
    return Docs(codes=c, n_tokens=rng.integers(1, 2000, n), quality=quality,
                doc_hash=rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64))


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(1, 10**7), min_size=1, max_size=40),
       rule=st.sampled_from(RULE_TEXTS), budget=st.integers(1, 10**8))
def test_stage1_weights_are_a_distribution(tokens, rule, budget):
    w = stage1_weights(np.array(tokens), parse_rule(rule), budget)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(1, 10**6), min_size=2, max_size=30), epochs=st.floats(0.5, 5),
       frac=st.floats(0.01, 0.99))
def test_unimax_respects_the_epoch_cap_when_the_budget_allows(tokens, epochs, frac):
    t = np.array(tokens, dtype=float)
    budget = frac * epochs * t.sum()            # feasible: below E x everything
    w = unimax(t, budget, epochs)
    assert np.all(w * budget <= epochs * t * (1 + 1e-9))
    # as uniform as allowed: a cell below its cap gets at least as much as any other cell
    alloc = w * budget
    free = alloc < epochs * t * (1 - 1e-9)
    if free.any():
        assert alloc[free].min() >= alloc.max() * (1 - 1e-9)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stage2_children_sum_to_their_parent(data):
    n_par = data.draw(st.integers(1, 10))
    parent = np.array(data.draw(st.lists(st.integers(0, n_par - 1), min_size=n_par, max_size=60)) + list(range(n_par)))
    mass = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=len(parent), max_size=len(parent))), float)
    w_par = stage1_weights(np.ones(n_par), Rule("uniform"))
    for sampler in ("proportional", "equal"):
        w, stranded = stage2_weights(parent, w_par, mass, sampler)
        assert np.all(w >= 0) and not stranded.any()
        assert np.allclose(np.bincount(parent, weights=w, minlength=n_par), w_par)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), rule=st.sampled_from(RULE_TEXTS), level=st.integers(1, 3),
       down=st.integers(0, 2), sampler=st.sampled_from(["proportional", "equal"]),
       eligible=st.sampled_from(["all", "top:0.3", "top:1"]), budget=st.integers(10**4, 2 * 10**6))
def test_mixture_properties(seed, rule, level, down, sampler, eligible, budget):
    docs = random_docs(seed, with_nulls=eligible != "all")
    m = min(3, level + down)
    spec = MixSpec(level=level, rule=rule, to_level=m, sampler=sampler, eligible=eligible,
                   budget_tokens=budget, seed=seed)
    mix = make_mixture(docs, spec)
    c = mix.cells
    # weights: a distribution whose level-M weights sum back to the Stage-1 weights
    assert np.all(c["weight"] >= 0) and c["weight"].sum() == pytest.approx(1.0)
    per_parent = np.bincount(c["parent"], weights=c["weight"])
    stage1 = np.zeros_like(per_parent)
    stage1[c["parent"]] = c["stage1_weight"]
    # a level-L cell with no eligible document (all its quality NULL) cannot keep its weight: it
    # goes to the others in proportion (and a warning says so); every other cell keeps its share
    eligible_mass = np.bincount(c["parent"], weights=c["available_tokens"], minlength=len(stage1))
    stranded = eligible_mass == 0
    if stranded.any():
        assert any("no eligible document" in w for w in mix.warnings)
        stage1 = np.where(stranded, 0.0, stage1) / stage1[~stranded].sum()
    assert np.allclose(per_parent, stage1)
    # tokens meet the budget within one document per cell, and in total within one document
    keys = docs.keys(m)
    sel = docs.n_tokens * mix.repeats
    assert abs(sel.sum() - c["target_tokens"].sum()) <= docs.n_tokens.max()
    for i, key in enumerate(c["key"]):
        in_cell = keys == key
        assert abs(sel[in_cell].sum() - c["target_tokens"][i]) <= docs.n_tokens[in_cell].max()
    # top:P: every selected document is at least its own cell's quantile
    top = parse_eligible(eligible)
    if top is not None:
        for i, key in enumerate(c["key"]):
            chosen = (keys == key) & (mix.repeats > 0)
            if chosen.any():
                q = docs.quality[keys == key]
                ref = np.quantile(q[~np.isnan(q)], 1 - top)      # slow reference, same interpolation
                assert np.all(docs.quality[chosen] >= ref - 1e-12)
    # same seed, same manifest
    again = make_mixture(docs, spec)
    assert np.array_equal(again.repeats, mix.repeats)


def test_a_different_seed_draws_other_documents():
    docs = random_docs(0, n=2000)
    spec = MixSpec(rule="uniform", budget_tokens=200_000, seed=1)
    a = make_mixture(docs, spec).repeats
    b = make_mixture(docs, MixSpec(rule="uniform", budget_tokens=200_000, seed=2)).repeats
    assert not np.array_equal(a, b)


def test_quantile_matches_numpy_per_cell():
    rng = np.random.default_rng(5)
    cell = rng.integers(0, 7, 500)
    q = rng.random(500)
    q[::17] = np.nan
    thr = within_cell_threshold(cell, q, 7, 0.7)
    for k in range(7):
        v = q[cell == k]
        assert thr[k] == pytest.approx(np.quantile(v[~np.isnan(v)], 0.7))


def test_epoch_cap_moves_the_remainder_to_other_cells():
    targets, capped = cap_epochs(np.array([0.5, 0.25, 0.25]), np.array([10.0, 1000, 1000]), 1000, 2.0)
    assert capped.tolist() == [True, False, False]
    assert targets[0] == 20 and targets.sum() == pytest.approx(1000)
    assert targets[1] == pytest.approx(targets[2])


def test_a_cell_the_remainder_brings_to_its_cap_counts_as_capped():
    targets, capped = cap_epochs(np.array([0.6, 0.4]), np.array([10.0, 10.0]), 40, 2.0)
    assert targets.tolist() == [20, 20] and capped.tolist() == [True, True]
    targets, capped = cap_epochs(np.array([0.5, 0.5, 0.0]), np.array([10.0, 10.0, 0.0]), 10, 2.0)
    assert capped.tolist() == [False, False, False]          # under the cap; an empty cell is not at it


def test_stage2_never_changes_stage1_weights_on_real_hierarchy():
    docs = random_docs(3, n=3000, k=6)
    for m in (1, 2, 3):
        mix = make_mixture(docs, MixSpec(rule="temperature:3", to_level=m, sampler="equal", budget_tokens=10**6))
        parents_w = {}
        for p, w in zip(mix.cells["parent"], mix.cells["weight"]):
            parents_w[p] = parents_w.get(p, 0) + w
        base = make_mixture(docs, MixSpec(rule="temperature:3", to_level=1, budget_tokens=10**6)).cells["weight"]
        assert np.allclose([parents_w[i] for i in range(len(base))], base)


@pytest.mark.parametrize("text", ["natural:1", "temperature:0", "temperature:x", "unimax:-1", "weights:", "zipf"])
def test_bad_rules_are_refused(text):
    with pytest.raises(HermesError):
        parse_rule(text)


@pytest.mark.parametrize("kwargs, message", [
    ({"level": 4}, "--level 4 is not a level"), ({"level": 2, "to_level": 1}, "--to-level 1 is below --level 2"),
    ({"sampler": "greedy"}, "unknown sampler 'greedy'"), ({"eligible": "top:0"}, "P must be in (0, 1]"),
    ({"eligible": "top:1.5"}, "P must be in (0, 1]"), ({"eligible": "best"}, "unknown eligibility"),
    ({"budget_tokens": 0}, "must be positive")])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(HermesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MixSpec(**kwargs).validate()


def test_top_p_without_quality_is_refused():
    docs = random_docs(1)
    docs.quality[:] = np.nan
    with pytest.raises(HermesError, match="needs quality scores"):
        make_mixture(docs, MixSpec(eligible="top:0.3"))


# --------------------------------------------------------------------------- drawing to the budget

def heavy_tailed_docs(seed: int, n: int, k: tuple[int, int, int], sigma: float = 1.2) -> Docs:
    """Documents with log-normal lengths (a few 20-300x the median, as web text) in skewed cells."""
    rng = np.random.default_rng(seed)
    c = np.stack([rng.zipf(1.6, n) % k[0], rng.integers(0, k[1], n), rng.integers(0, k[2], n)], axis=1)
    n_tokens = np.maximum(1, rng.lognormal(6.0, sigma, n)).astype(np.int64)
    return Docs(codes=c, n_tokens=n_tokens, quality=rng.random(n),
                doc_hash=rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64))


def test_balanced_round_keeps_each_probability_and_the_total():
    rng = np.random.default_rng(0)
    p = rng.random(30)
    p[:3] = [0.0, 1.0, 0.5]
    size = rng.lognormal(5, 1.5, 30)
    runs = 4000
    hits = np.zeros(30)
    for seed in range(runs):
        chosen = balanced_round(p, size, np.random.default_rng(seed))
        # the chosen units' size is within one unit of the expected total, every time
        assert abs(size[chosen].sum() - (p * size).sum()) <= size.max()
        hits += chosen
    assert hits[0] == 0 and hits[1] == runs
    # each unit is chosen with its own probability (4.5 standard errors)
    se = np.sqrt(p * (1 - p) / runs)
    assert np.all(np.abs(hits / runs - p) <= 4.5 * se + 1e-12)


@pytest.mark.parametrize("to_level, sampler", [(1, "proportional"), (2, "proportional"), (3, "equal")])
def test_budget_is_met_over_seeds(to_level, sampler):
    """20 seeds, single documents up to 30% of the budget: the total within 1% of the budget or one
    document, and within 1% on average; every cell within one document of its target; each L1
    cell's mean over seeds near its target."""
    docs = heavy_tailed_docs(1, 6000, (12, 8, 8), sigma=1.5)
    budget = 400_000
    assert docs.n_tokens.max() > 0.25 * budget
    sel_by_seed, errors = [], []
    for seed in range(20):
        mix = make_mixture(docs, MixSpec(rule="temperature:2", to_level=to_level, sampler=sampler,
                                         budget_tokens=budget, seed=seed))
        c = mix.cells
        got = c["selected_tokens"]
        errors.append(abs(got.sum() - budget))
        assert errors[-1] <= max(0.01 * budget, docs.n_tokens.max())
        keys = docs.keys(to_level)
        biggest = np.array([docs.n_tokens[keys == k].max() for k in c["key"]])
        assert np.all(np.abs(got - c["target_tokens"]) <= biggest)
        sel_by_seed.append(np.bincount(c["parent"], weights=got))
    assert np.mean(errors) <= 0.01 * budget
    # per L1 cell, the mean over seeds is within 5% of its target (or of one median document)
    mean = np.mean(sel_by_seed, axis=0)
    target = np.bincount(c["parent"], weights=c["target_tokens"])
    assert np.all(np.abs(mean - target) <= np.maximum(0.05 * target, np.median(docs.n_tokens)))


def test_natural_mixture_keeps_natural_shares():
    """natural + proportional + all, with at least 50 documents' worth of budget per L1 cell: TV to
    natural at L1 stays within 0.05 for every seed."""
    docs = heavy_tailed_docs(2, 20000, (40, 16, 8))
    n_l1 = len(np.unique(docs.codes[:, 0]))
    budget = int(50 * n_l1 * np.mean(docs.n_tokens))
    for seed in range(20):
        for m in (1, 2):
            mix = make_mixture(docs, MixSpec(rule="natural", to_level=m, budget_tokens=budget, seed=seed))
            assert mix.diagnostics["levels"]["L1"]["tv_to_natural"] <= 0.05


def test_a_budget_over_the_epoch_cap_names_the_largest_feasible_one():
    docs = random_docs(0, n=500)
    cap_total = int(2 * docs.n_tokens.sum())
    with pytest.raises(HermesError, match=f"largest feasible budget is {cap_total:,} tokens"):
        make_mixture(docs, MixSpec(rule="uniform", budget_tokens=cap_total + 1000, max_epochs=2))
    mix = make_mixture(docs, MixSpec(rule="uniform", budget_tokens=cap_total, max_epochs=2))
    assert mix.repeats.max() <= 2


def test_each_cells_expected_tokens_are_its_target():
    """Unbiased: over many seeds, every level-M cell's mean selected tokens converge on its target
    (documents' own lengths; the fill and the joint last draws included)."""
    docs = heavy_tailed_docs(3, 300, (4, 3, 3))
    spec = dict(rule="temperature:2", to_level=2, budget_tokens=int(0.3 * docs.n_tokens.sum()))
    runs = [make_mixture(docs, MixSpec(seed=s, **spec)).cells for s in range(600)]
    got = np.array([c["selected_tokens"] for c in runs])
    target = runs[0]["target_tokens"]
    keys = docs.keys(2)
    biggest = np.array([docs.n_tokens[keys == k].max() for k in runs[0]["key"]])
    se = got.std(axis=0) / np.sqrt(len(runs))
    assert np.all(np.abs(got.mean(axis=0) - target) <= 4.5 * se + 1e-6 * biggest)
    # pooled over cells, a bias of a few percent in the last draws' probabilities shows (z about 6)
    z = (got.mean(axis=0) - target) / np.maximum(se, 1e-9)
    assert abs(z.sum() / np.sqrt(len(z))) <= 3.5
    total = got.sum(axis=1)
    assert abs(total.mean() - target.sum()) <= 3.5 * total.std() / np.sqrt(len(total)) + 1e-6


def test_unimax_over_its_epoch_cap_warns_and_says_so_in_the_diagnostics():
    docs = random_docs(1, n=300)
    total = int(docs.n_tokens.sum())
    within = make_mixture(docs, MixSpec(rule="unimax:2", budget_tokens=total))
    assert within.diagnostics["stage1"]["unimax_cap_exceeded"] is False
    assert not any("beyond the cap" in w for w in within.warnings)
    over = make_mixture(docs, MixSpec(rule="unimax:2", budget_tokens=3 * total))
    assert over.diagnostics["stage1"]["unimax_cap_exceeded"] is True
    assert any("3.00 passes over the corpus, more than 2" in w for w in over.warnings)
    assert over.repeats.max() >= 3


def reference_fill(tokens: list[int], target: float) -> tuple[list[bool], float]:
    """The draw before its last document, as a plain walk in priority order: the prefix that fits,
    then, while a gap is left, each later document that still fits."""
    taken, gap, in_prefix = [], target, True
    for t in tokens:
        in_prefix = in_prefix and t <= gap + 1e-9
        taken.append(in_prefix or (gap > 1e-9 and t <= gap + 1e-9))
        gap -= t if taken[-1] else 0
    return taken, gap


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fill_matches_a_plain_walk(data):
    """The vectorised draw takes exactly what a document-by-document walk takes, in every cell, before
    the last (joint) draws; zero-token and huge documents included."""
    from hermes.mixers import draw

    n_cells = data.draw(st.integers(1, 5))
    cell = np.array(data.draw(st.lists(st.integers(0, n_cells - 1), min_size=1, max_size=80)))
    tokens = np.array(data.draw(st.lists(st.sampled_from([0, 1, 3, 5, 40, 300, 5000]), min_size=len(cell),
                                         max_size=len(cell))))
    prio = np.arange(len(cell), dtype=np.uint64)[::-1].copy()          # priority order: last first
    avail = np.bincount(cell, weights=tokens, minlength=n_cells)
    targets = np.array([data.draw(st.floats(0, 0.999)) for _ in range(n_cells)]) * avail
    got = draw(cell, np.ones(len(cell), bool), tokens, prio, targets, np.random.default_rng(0))
    for k in range(n_cells):
        members = np.flatnonzero(cell == k)[::-1]                        # in priority order
        taken, gap = reference_fill(tokens[members].tolist(), targets[k])
        taken_arr = np.array(taken, dtype=bool)
        extra = got[members] - taken_arr.astype(np.int64)
        assert np.all((extra == 0) | ((extra == 1) & ~taken_arr)), (tokens[members], targets[k], got[members])
        if extra.sum():
            last = members[extra == 1][0]
            left = [t for t, tk in zip(tokens[members], taken) if not tk]
            assert tokens[last] == min(left) and tokens[last] > gap         # the smallest left, larger than the gap


def test_a_long_run_of_small_documents_fills_the_gap():
    """One big document first, then thousands of small ones: the cell still meets its target."""
    from hermes.mixers import draw

    tokens = np.array([10_000] + [5] * 3_000)
    prio = np.arange(len(tokens), dtype=np.uint64)[::-1].copy()
    got = draw(np.zeros(len(tokens), np.int64), np.ones(len(tokens), bool), tokens, prio, np.array([9_000.0]),
               np.random.default_rng(0))
    assert (got * tokens).sum() == 9_000 and got[0] == 0


def test_the_default_budget_under_an_epoch_cap_is_what_the_cap_allows():
    docs = random_docs(2, n=500)
    mix = make_mixture(docs, MixSpec(rule="uniform", eligible="top:0.3", max_epochs=2))    # no budget given
    eligible_tokens = mix.cells["available_tokens"].sum()
    assert mix.diagnostics["budget_tokens"] == int(2 * eligible_tokens) < docs.n_tokens.sum() * 2
    assert any("the default budget" in w for w in mix.warnings) and mix.repeats.max() <= 2


def test_a_negative_seed_draws_deterministically():
    docs = random_docs(4, n=300)
    a, b = (make_mixture(docs, MixSpec(rule="uniform", budget_tokens=50_000, seed=-3)).repeats for _ in range(2))
    assert np.array_equal(a, b)


def test_stage1_formulas():
    tokens = np.array([100.0, 400.0, 1600.0])
    assert stage1_weights(tokens, parse_rule("natural")) == pytest.approx(tokens / tokens.sum())
    assert stage1_weights(tokens, parse_rule("uniform")) == pytest.approx([1 / 3] * 3)
    root = np.sqrt(tokens)                                  # temperature 2: tokens^(1/2)
    assert stage1_weights(tokens, parse_rule("temperature:2")) == pytest.approx(root / root.sum())
    # UniMax: budget 1,200 over three cells, at most 1 epoch, smallest first: 100 (capped from 400),
    # 400 (capped from 550), and the largest takes the rest, 700
    assert stage1_weights(tokens, parse_rule("unimax:1"), budget=1200) == pytest.approx(
        np.array([100, 400, 700]) / 1200)


def test_proportional_and_equal_split_a_parent_differently():
    parent, mass = np.array([0, 0, 0, 1]), np.array([10.0, 30.0, 0.0, 5.0])
    w, _ = stage2_weights(parent, np.array([0.8, 0.2]), mass, "proportional")
    assert w == pytest.approx([0.2, 0.6, 0.0, 0.2])         # by eligible tokens
    w, _ = stage2_weights(parent, np.array([0.8, 0.2]), mass, "equal")
    assert w == pytest.approx([0.4, 0.4, 0.0, 0.2])         # the same for each child with an eligible document
