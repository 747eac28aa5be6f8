"""Mixers: rules and samplers as pure functions of arrays (no database in here).

A mixture is made in two stages, as in HERMES:

1. Stage 1, a *rule* over the cells of level L sets their weights:
   `natural` (w ~ tokens), `uniform`, `temperature:T` (w ~ tokens^(1/T)), `unimax:E` (as uniform
   as the budget allows with at most E epochs per cell, the leftover spread over the rest), or
   `weights:FILE` (external weights by cell key).
2. Stage 2, a *sampler*, splits each level-L cell's weight over its level-M descendants (M >= L)
   without changing it: child mass `proportional` to the child's eligible tokens, or `equal` per
   child with any eligible document. Eligibility is `all`, or `top:P`: the documents whose quality
   is at least the (1 - P) quantile of their own level-M cell.

Then every level-M cell's target (weight x budget) is met by drawing its eligible documents in a
seeded random order, whole passes first when the target exceeds what the cell has (repeats), up to
an optional epoch cap, after which the remainder is spread over the cells below their cap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hermes.cellkeys import LEVELS, key_text, level_name, pack, parent_keys
from hermes.errors import HermesError

RULES = ("natural", "uniform", "temperature:T", "unimax:E", "weights:FILE")
SAMPLERS = ("proportional", "equal")
ELIGIBLE = ("all", "top:P")
SMALL_POOL = 30          # a level-M cell with fewer eligible documents than this is a small pool


# --------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class Rule:
    kind: str
    param: float | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind in ("temperature", "unimax"):
            return f"{self.kind}:{self.param:g}"
        if self.kind == "weights":
            return f"weights:{self.path}"
        return self.kind


def parse_rule(text: str) -> Rule:
    kind, _, arg = text.partition(":")
    if kind in ("natural", "uniform") and not arg:
        return Rule(kind)
    if kind in ("temperature", "unimax"):
        try:
            value = float(arg)
        except ValueError:
            value = float("nan")
        if not value > 0 or math.isinf(value):
            what = "T" if kind == "temperature" else "E (max epochs)"
            raise HermesError(f"rule '{text}': {what} must be a positive number, e.g. {kind}:2")
        return Rule(kind, value)
    if kind == "weights" and arg:
        return Rule(kind, path=arg)
    raise HermesError(f"unknown rule '{text}'", hint=f"valid rules: {', '.join(RULES)}")


def parse_sampler(text: str) -> str:
    if text not in SAMPLERS:
        raise HermesError(f"unknown sampler '{text}'", hint=f"valid samplers: {', '.join(SAMPLERS)}")
    return text


def parse_eligible(text: str) -> float | None:
    """None for `all`, else the top fraction P of `top:P`."""
    if text == "all":
        return None
    kind, _, arg = text.partition(":")
    if kind == "top":
        try:
            p = float(arg)
        except ValueError:
            p = float("nan")
        if not 0 < p <= 1:
            raise HermesError(f"eligibility '{text}': P must be in (0, 1], e.g. top:0.3")
        return p
    raise HermesError(f"unknown eligibility '{text}'", hint=f"valid: {', '.join(ELIGIBLE)}")


def check_levels(level: int, to_level: int) -> None:
    for name, v in (("--level", level), ("--to-level", to_level)):
        if v not in LEVELS:
            raise HermesError(f"{name} {v} is not a level; levels are 1 (L1), 2 (L12), 3 (L123)")
    if to_level < level:
        raise HermesError(f"--to-level {to_level} is below --level {level}",
                          hint="Stage 2 splits a level-L cell into its sub-cells, so M >= L")


@dataclass(frozen=True)
class MixSpec:
    level: int = 1
    rule: str = "natural"
    to_level: int | None = None          # None = level
    sampler: str = "proportional"
    eligible: str = "all"
    budget_tokens: int | None = None     # None = all tokens of the store
    seed: int = 0
    max_epochs: float | None = None      # None = no cap

    @property
    def draw_level(self) -> int:
        """The level whose cells a mixture draws from (`to_level`, else `level`)."""
        return self.level if self.to_level is None else self.to_level

    def validate(self) -> "MixSpec":
        check_levels(self.level, self.draw_level)
        parse_rule(self.rule)
        parse_sampler(self.sampler)
        parse_eligible(self.eligible)
        if self.budget_tokens is not None and self.budget_tokens <= 0:
            raise HermesError(f"--budget-tokens {self.budget_tokens} must be positive")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise HermesError(f"--max-epochs {self.max_epochs} must be positive")
        return self

    def name(self) -> str:
        """A folder name for the mixture: one path component (a weights file shows by its stem)."""
        rule = parse_rule(self.rule)
        text = f"weights-{Path(rule.path).stem}" if rule.kind == "weights" else self.rule
        name = f"L{self.level}-{text}-to-L{self.draw_level}-{self.sampler}-{self.eligible}"
        return re.sub(r"[^A-Za-z0-9._-]", "", name)


# --------------------------------------------------------------------------- Stage 1

def unimax(tokens: np.ndarray, budget: float, max_epochs: float) -> np.ndarray:
    """UniMax: walk the cells from smallest up, give each the uniform share of what is left,
    but at most max_epochs passes over it; larger cells absorb the leftover."""
    tokens = np.asarray(tokens, dtype=np.float64)
    alloc = np.zeros_like(tokens)
    remaining = float(budget)
    order = np.argsort(tokens, kind="stable")
    for i, c in enumerate(order):
        share = remaining / (len(order) - i)
        alloc[c] = min(share, max_epochs * tokens[c])
        remaining -= alloc[c]
    total = alloc.sum()
    return alloc / total if total > 0 else np.full(len(tokens), 1 / len(tokens))


def stage1_weights(tokens: np.ndarray, rule: Rule, budget: float | None = None,
                   external: np.ndarray | None = None) -> np.ndarray:
    """Weights over level-L cells from their token counts. Non-negative, sum to 1."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if len(tokens) == 0:
        raise HermesError("there are no cells to weight")
    if rule.kind == "natural":
        w = tokens.copy()
    elif rule.kind == "uniform":
        w = np.ones_like(tokens)
    elif rule.kind == "temperature":
        w = np.power(tokens, 1.0 / rule.param)
    elif rule.kind == "unimax":
        if budget is None:
            raise HermesError("unimax needs a token budget")
        return unimax(tokens, budget, rule.param)
    elif rule.kind == "weights":
        if external is None:
            raise HermesError("weights:FILE rule without weights")
        w = np.asarray(external, dtype=np.float64)
    else:
        raise HermesError(f"unknown rule '{rule}'", hint=f"valid rules: {', '.join(RULES)}")
    total = w.sum()
    if not total > 0:
        raise HermesError(f"rule '{rule}' gives every cell weight 0")
    return w / total


# --------------------------------------------------------------------------- Stage 2

def stage2_weights(parent: np.ndarray, w_parent: np.ndarray, mass: np.ndarray, sampler: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Split each parent's weight over its children.

    parent[i] is the index (into w_parent) of child i's parent; mass[i] is child i's eligible
    tokens. Returns (child weights, the weight of parents with no eligible child, per parent).
    A parent's children always sum to the parent's weight, unless it has no eligible child.
    """
    parent = np.asarray(parent, dtype=np.int64)
    mass = np.asarray(mass, dtype=np.float64)
    n_par = len(w_parent)
    if sampler == "proportional":
        share = mass
    elif sampler == "equal":
        share = (mass > 0).astype(np.float64)
    else:
        raise HermesError(f"unknown sampler '{sampler}'", hint=f"valid samplers: {', '.join(SAMPLERS)}")
    per_parent = np.bincount(parent, weights=share, minlength=n_par)
    denom = per_parent[parent]
    w = np.where(denom > 0, np.asarray(w_parent)[parent] * share / np.where(denom > 0, denom, 1), 0.0)
    stranded = np.where(per_parent > 0, 0.0, w_parent)
    return w, stranded


def cap_epochs(weights: np.ndarray, available: np.ndarray, budget: float, max_epochs: float | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Token targets per cell: weight x budget, but at most max_epochs x available; what a capped
    cell cannot take is spread over the uncapped cells in proportion to their weights.
    Returns (targets, which cells are at their cap: pushed back to it, or brought up to it by
    what others could not take)."""
    w = np.asarray(weights, dtype=np.float64)
    avail = np.asarray(available, dtype=np.float64)
    targets = w * budget
    capped = np.zeros(len(w), dtype=bool)
    if max_epochs is None:
        return targets, capped
    limit = max_epochs * avail
    for _ in range(len(w) + 1):
        over = (targets > limit * (1 + 1e-12)) & ~capped
        if not over.any():
            break
        capped |= over
        leftover = float(np.sum(targets[capped] - limit[capped]))
        targets[capped] = limit[capped]
        free = ~capped & (w > 0)
        if not free.any() or leftover <= 0:
            break
        targets[free] += leftover * w[free] / w[free].sum()
    return targets, capped | ((limit > 0) & (targets >= limit * (1 - 1e-12)))


# --------------------------------------------------------------------------- documents

@dataclass
class Docs:
    """The label table as arrays, in store order."""

    codes: np.ndarray        # (n, 3) int codes
    n_tokens: np.ndarray     # (n,) int64
    quality: np.ndarray      # (n,) float64, NaN where NULL
    doc_hash: np.ndarray     # (n,) uint64, a hash of doc_id (seeded priorities derive from it)
    names: dict[int, list[str]] = field(default_factory=dict)   # a fixed stage's class names by code

    def __len__(self) -> int:
        return len(self.n_tokens)

    def keys(self, level: int) -> np.ndarray:
        """An int64 key per document for its level-`level` cell (cellkeys.pack)."""
        return pack(self.codes, level)


def factorize(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, index of each key among them), as np.unique(return_inverse=True) but
    hash-based: O(n + u log u) instead of a sort of all n keys (seconds saved on 10M labels)."""
    import pandas as pd

    codes, uniques = pd.factorize(keys, sort=True)
    return np.asarray(uniques), codes.astype(np.int64)


def priorities(doc_hash: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random order key per document (splitmix64 of hash ^ seed)."""
    with np.errstate(over="ignore"):
        z = doc_hash.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def within_cell_threshold(cell: np.ndarray, quality: np.ndarray, n_cells: int, q: float) -> np.ndarray:
    """Per cell, the q-quantile of its documents' quality (linear interpolation, NULLs ignored,
    as DuckDB's quantile_cont). NaN for a cell with no quality at all."""
    ok = ~np.isnan(quality)
    cc, qq = cell[ok], quality[ok]
    order = np.lexsort((qq, cc))
    cc, qq = cc[order], qq[order]
    counts = np.bincount(cc, minlength=n_cells)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    thr = np.full(n_cells, np.nan)
    has = counts > 0
    h = q * (counts[has] - 1)
    lo = np.floor(h).astype(np.int64)
    hi = np.ceil(h).astype(np.int64)
    s = starts[has]
    thr[has] = qq[s + lo] + (h - lo) * (qq[s + hi] - qq[s + lo])
    return thr


def balanced_round(p: np.ndarray, size: np.ndarray, rng: np.random.Generator,
                   group: np.ndarray | None = None) -> np.ndarray:
    """Round each unit's probability p to 0 or 1 so that P(1) = p exactly and the chosen units'
    total size is within one unit's size of sum(p * size); with `group`, also each group's total
    within one of its units' size of its own expectation.

    Balanced sampling on one auxiliary variable (the cube method of Deville & Tille, 2004, whose
    flight phase with one balancing equation is this pairwise walk): two undecided units move along
    the line that keeps p_i size_i + p_j size_j fixed until one reaches 0 or 1, to either end with
    the probabilities that keep each p a martingale. The walk runs inside each group first (larger
    units first, ties in a seeded order), which leaves one undecided unit per group; then over
    those, larger first; the last one is drawn with its own probability (the landing phase).
    Written here because no maintained Python library offers it (R's `sampling::samplecube` does).
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    size = np.asarray(size, dtype=np.float64)
    out = p >= 1.0
    group = np.zeros(len(p), dtype=np.int64) if group is None else np.asarray(group)
    order = np.lexsort((rng.random(len(p)), -size, group))
    order = order[(p[order] > 0) & (p[order] < 1)]
    pv, sz = p.tolist(), size.tolist()
    u = iter(rng.random(2 * len(order) + 1).tolist())
    eps = 1e-12

    def walk(units) -> int:
        cur = -1
        for j in units:
            if cur < 0:
                cur = j
                continue
            i = cur
            a_i, a_j, p_i, p_j = sz[i], sz[j], pv[i], pv[j]
            up = min((1.0 - p_i) / a_j, p_j / a_i)          # p_i rises, p_j falls
            down = min(p_i / a_j, (1.0 - p_j) / a_i)        # p_i falls, p_j rises
            t = up if next(u) * (up + down) < down else -down   # E[move] = 0
            p_i, p_j = p_i + t * a_j, p_j - t * a_i
            pv[i], pv[j] = p_i, p_j
            done_i = p_i <= eps or p_i >= 1 - eps
            done_j = p_j <= eps or p_j >= 1 - eps
            if done_i:
                out[i] = p_i >= 1 - eps
            if done_j:
                out[j] = p_j >= 1 - eps
            cur = -1 if done_i and done_j else (j if done_i else i)
        return cur

    g = group[order]
    bounds = np.flatnonzero(np.diff(g)) + 1
    left = [k for k in (walk(part.tolist()) for part in np.split(order, bounds)) if k >= 0]
    left.sort(key=lambda k: -sz[k])
    last = walk(left)
    if last >= 0:
        out[last] = next(u) < pv[last]
    return out


def passes(cell: np.ndarray, eligible: np.ndarray, tokens: np.ndarray, prio: np.ndarray, targets: np.ndarray
           ) -> tuple[np.ndarray, ...]:
    """The eligible documents in draw order (by cell, then priority): their indices, cells and
    tokens; per cell the whole passes its target takes and the rest of the target after them; and
    per document the tokens of its cell that come before it in that order."""
    n_cells = len(targets)
    idx = np.flatnonzero(eligible)
    cc, tt = cell[idx], tokens[idx].astype(np.float64)
    order = np.lexsort((prio[idx], cc))
    idx, cc, tt = idx[order], cc[order], tt[order]
    avail = np.bincount(cc, weights=tt, minlength=n_cells)
    full = np.zeros(n_cells)
    pos = avail > 0
    full[pos] = np.floor(targets[pos] / avail[pos])
    rest = targets - full * avail
    csum = np.cumsum(tt)
    starts = np.concatenate([[0], np.cumsum(np.bincount(cc, minlength=n_cells))[:-1]])
    before = csum - tt - np.concatenate([[0.0], csum])[starts][cc]
    return idx, cc, tt, full, rest, before


def draw_prefix(cell: np.ndarray, eligible: np.ndarray, tokens: np.ndarray, prio: np.ndarray,
                targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Everything of `draw` but its joint last step, over any set of whole cells (`cell` indexes
    `targets`): (repeats per document without the last draws; the last draws as the document of
    each open cell that may join, in cell order, its cell, its probability and its tokens)."""
    n_cells = len(targets)
    idx, cc, tt, full, rest, before = passes(cell, eligible, tokens, prio, targets)
    take = before + tt <= rest[cc] + 1e-9                     # the prefix that fits
    gap = rest - np.bincount(cc, weights=tt * take, minlength=n_cells)
    # the fill, as a walk in priority order that takes each document that still fits, done in rounds:
    # each round takes, per cell, the longest run of the documents that fit its gap whose sum fits;
    # the first one after that run overshoots and is passed over (as is every document that does not
    # fit now: gaps only shrink), and the next round goes on from there. Each round takes at least
    # one document per cell still open, so the loop ends.
    cand = np.flatnonzero(~take & (gap[cc] > 1e-9))
    fit = cand
    while True:
        fit = fit[~take[fit] & (tt[fit] <= gap[cc[fit]] + 1e-9)]
        if not len(fit):
            break
        c = cc[fit]
        run = np.cumsum(tt[fit])
        first = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        run -= np.repeat(run[first] - tt[fit][first], np.diff(np.r_[first, len(fit)]))
        chosen = fit[run <= gap[c] + 1e-9]         # the run's sums only grow: a prefix per cell
        take[chosen] = True
        gap -= np.bincount(cc[chosen], weights=tt[chosen], minlength=n_cells)
    # the smallest document left per cell with a gap (first in priority order among equals); every
    # document left is larger than the gap, so its probability is below 1
    left = cand[~take[cand] & (gap[cc[cand]] > 1e-9)]
    left = left[np.lexsort((left, tt[left], cc[left]))]
    last = left[np.unique(cc[left], return_index=True)[1]]
    out = np.zeros(len(cell), dtype=np.int64)
    out[idx] = (full[cc] + take).astype(np.int64)
    return out, idx[last], cc[last], gap[cc[last]] / tt[last], tt[last]


def draw(cell: np.ndarray, eligible: np.ndarray, tokens: np.ndarray, prio: np.ndarray,
         targets: np.ndarray, rng: np.random.Generator, group: np.ndarray | None = None) -> np.ndarray:
    """Repeats per document so that each cell's selected tokens are within one document of its
    target and the total is within about one small document of the sum of the targets.

    Per cell: whole passes over its eligible documents while the target exceeds what it has, then
    its documents in priority order while they fit; a document that would overshoot is passed
    over and later ones that still fit are taken, until none fits. The gap left is smaller than
    every document left; the smallest of them joins with probability gap / its tokens, so the
    cell's expected tokens are its target. Those last draws are made jointly over cells by
    `balanced_round`, so their roundings do not add up across cells (nor across the cells of one
    `group`: a Stage-1 cell). `group` is per cell."""
    out, last, last_cell, frac, size = draw_prefix(cell, eligible, tokens, prio, targets)
    out[last[balanced_round(frac, size, rng, None if group is None else group[last_cell])]] += 1
    return out


def draw_rng(seed: int) -> np.random.Generator:
    """The generator of a mixture's last draws (`balanced_round`)."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 0x5BD1E995])


# --------------------------------------------------------------------------- the mixture

@dataclass
class Mixture:
    spec: MixSpec
    cells: dict[str, np.ndarray]           # one entry per level-M cell (see make_mixture)
    repeats: np.ndarray | None             # per document, in store order (None: made cell by cell, on disk)
    diagnostics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    masses: dict[int, tuple[np.ndarray, np.ndarray]] | None = None    # per level: cell tokens, natural and mixed


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclass
class CellStats:
    """What Stage 1 and Stage 2 need of a store: per level-L cell its tokens, per level-M cell its
    eligible tokens and documents and its quality threshold (keys sorted, as `factorize` gives)."""

    keys_L: np.ndarray
    tokens_L: np.ndarray
    keys_M: np.ndarray
    eligible_tokens: np.ndarray
    eligible_docs: np.ndarray
    threshold: np.ndarray           # NaN where every document is eligible (or the cell has no quality)


@dataclass
class Plan:
    """Stage 1 and Stage 2 made concrete: per level-M cell its parent, weights and token target."""

    parent: np.ndarray              # per level-M cell, its level-L cell's index
    w_L: np.ndarray
    w_M: np.ndarray
    targets: np.ndarray
    budget: float
    warnings: list[str]
    over_cap: bool


def eligible_of(cell: np.ndarray, quality: np.ndarray, n_cells: int, top: float | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(each document's eligibility, each cell's quality threshold) for `eligible` = all (None) or
    top:P: at least the (1 - P) quantile of the document's own cell."""
    if top is None:
        return np.ones(len(cell), dtype=bool), np.full(n_cells, np.nan)
    thr = within_cell_threshold(cell, quality, n_cells, 1 - top)
    return ~np.isnan(quality) & (quality >= thr[cell] - 1e-12), thr


def plan(stats: CellStats, spec: MixSpec, total_tokens: float, names: dict[int, list[str]],
         external: dict[str, float] | None = None, external_source: str = "weights file") -> Plan:
    """Stage 1 (the rule's weights over level-L cells), Stage 2 (each one's weight split over its
    level-M cells) and the token targets, from the cells' statistics alone."""
    L, M = spec.level, spec.draw_level
    rule = parse_rule(spec.rule)
    warnings: list[str] = []
    budget = float(spec.budget_tokens) if spec.budget_tokens else total_tokens
    uL, tok_L, elig_tok = stats.keys_L, stats.tokens_L, stats.eligible_tokens
    parent = np.searchsorted(uL, parent_keys(stats.keys_M, M, L))
    ext = None
    if rule.kind == "weights":
        keys = key_text(uL, L, names)
        ext = np.array([external.get(n, 0.0) for n in keys]) if external else None
        missing = [n for n in keys if n not in (external or {})]
        if missing:
            warnings.append(f"{len(missing)} of {len(keys)} L{L} cells are not in the {external_source} "
                            f"and get weight 0 (e.g. {', '.join(missing[:5])})")
    w_L = stage1_weights(tok_L, rule, budget, ext)
    over_cap = rule.kind == "unimax" and budget > rule.param * tok_L.sum()
    if over_cap:
        warnings.append(f"unimax:{rule.param:g}: the budget is {budget / tok_L.sum():.2f} passes over the corpus, "
                        f"more than {rule.param:g}; every cell is repeated beyond the cap")
    w_M, stranded = stage2_weights(parent, w_L, elig_tok, spec.sampler)
    if stranded.sum() > 0:
        warnings.append(f"{int((stranded > 0).sum())} L{L} cells with {stranded.sum():.1%} of the weight have no "
                        f"eligible document; their weight is spread over the others")
        w_M = w_M / w_M.sum()
    if spec.max_epochs is not None:
        feasible = spec.max_epochs * float(elig_tok[w_M > 0].sum())
        if budget > feasible and spec.budget_tokens:
            raise HermesError(f"--budget-tokens {budget:,.0f} is more than these cells hold under --max-epochs "
                              f"{spec.max_epochs:g}: the largest feasible budget is {math.floor(feasible):,} tokens",
                              hint="lower the budget, or raise or drop --max-epochs")
        if budget > feasible:       # the default budget (every token of the store): as much as the cap allows
            warnings.append(f"the default budget (all {budget:,.0f} tokens of the store) is more than the eligible "
                            f"documents hold under --max-epochs {spec.max_epochs:g}; the budget is "
                            f"{math.floor(feasible):,} tokens")
            budget = float(math.floor(feasible))
    targets, capped = cap_epochs(w_M, elig_tok, budget, spec.max_epochs)
    if capped.any():
        warnings.append(f"{int(capped.sum())} cells hit the cap of {spec.max_epochs:g} epochs; "
                        f"their remainder went to the other cells")
    return Plan(parent, w_L, w_M, targets, budget, warnings, over_cap)


def cell_table(stats: CellStats, p: Plan, selected_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """One entry per level-M cell: what `weights.parquet` holds."""
    elig_tok = stats.eligible_tokens
    return {"key": stats.keys_M, "parent": p.parent, "stage1_weight": p.w_L[p.parent], "weight": p.w_M,
            "target_tokens": p.targets, "available_tokens": elig_tok, "eligible_docs": stats.eligible_docs,
            "selected_tokens": selected_tokens, "quality_threshold": stats.threshold,
            "epochs": np.divide(p.targets, elig_tok, out=np.zeros(len(elig_tok)), where=elig_tok > 0)}


def make_mixture(docs: Docs, spec: MixSpec, external: dict[str, float] | None = None,
                 external_source: str = "weights file") -> Mixture:
    """Stage 1 + Stage 2 + draw, all from arrays. `external` maps level-L cell keys to weights."""
    spec.validate()
    L, M = spec.level, spec.draw_level
    top = parse_eligible(spec.eligible)
    tokens = docs.n_tokens.astype(np.int64)
    cells_at = {level: factorize(docs.keys(level)) for level in LEVELS}   # once, for Stage 1/2 and diagnostics
    uL, cell_L = cells_at[L]
    uM, cell_M = cells_at[M]
    if top is not None and np.isnan(docs.quality).all():
        raise no_quality(spec)
    eligible, thr = eligible_of(cell_M, docs.quality, len(uM), top)
    stats = CellStats(uL, np.bincount(cell_L, weights=tokens, minlength=len(uL)), uM,
                      np.bincount(cell_M, weights=tokens * eligible, minlength=len(uM)),
                      np.bincount(cell_M, weights=eligible, minlength=len(uM)).astype(np.int64), thr)
    p = plan(stats, spec, float(tokens.sum()), docs.names, external, external_source)
    repeats = draw(cell_M, eligible, tokens, priorities(docs.doc_hash, spec.seed), p.targets, draw_rng(spec.seed),
                   p.parent)
    cells = cell_table(stats, p, np.bincount(cell_M, weights=tokens * repeats, minlength=len(uM)))
    diag = diagnostics(docs, spec, repeats, cells, p.budget, p.w_L, {lv: inv for lv, (_, inv) in cells_at.items()})
    return finish(spec, cells, repeats, diag, p)


def no_quality(spec: MixSpec) -> HermesError:
    return HermesError(f"eligibility '{spec.eligible}' needs quality scores, and this store has none",
                       hint="label with --quality heuristic or --quality-field NAME, or use --eligible all")


def finish(spec: MixSpec, cells: dict[str, np.ndarray], repeats: np.ndarray | None, diag: dict[str, Any],
           p: Plan, masses: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> Mixture:
    warnings = p.warnings + diag.pop("_warnings")
    if parse_rule(spec.rule).kind == "unimax":
        diag["stage1"]["unimax_cap_exceeded"] = bool(p.over_cap)
    return Mixture(spec=spec, cells=cells, repeats=repeats, diagnostics=diag, warnings=warnings, masses=masses)


def diagnostics(docs: Docs, spec: MixSpec, repeats: np.ndarray, cells: dict[str, np.ndarray], budget: float,
                w_L: np.ndarray, cell_index: dict[int, np.ndarray]) -> dict[str, Any]:
    """`cell_index[level]`: each document's cell index at that level (from factorize)."""
    tokens = docs.n_tokens.astype(np.float64)
    sel = tokens * repeats
    mass = {}
    for level, inv in cell_index.items():
        nat = np.bincount(inv, weights=tokens)
        mass[level] = nat, np.bincount(inv, weights=sel, minlength=len(nat))
    ok_q = ~np.isnan(docs.quality) & (repeats > 0)
    return mixture_diagnostics(spec, cells, budget, w_L, mass, Totals(
        selected=float(sel.sum()), unique_docs=int((repeats > 0).sum()), docs=int(len(repeats)),
        max_repeats=int(repeats.max()) if len(repeats) else 0,
        repeated=float((tokens * np.maximum(repeats - 1, 0)).sum()),
        quality_tokens=float((docs.quality[ok_q] * sel[ok_q]).sum()), quality_weight=float(sel[ok_q].sum())))


@dataclass
class Totals:
    """Sums over a mixture's documents that its diagnostics need (summed in any order)."""

    selected: float = 0.0          # tokens selected, repeats counted
    unique_docs: int = 0
    docs: int = 0                  # documents in the store
    max_repeats: int = 0
    repeated: float = 0.0          # tokens of repeats beyond the first
    quality_tokens: float = 0.0    # sum of quality x selected tokens, over documents with a quality
    quality_weight: float = 0.0    # selected tokens of those documents


def mixture_diagnostics(spec: MixSpec, cells: dict[str, np.ndarray], budget: float, w_L: np.ndarray,
                        mass: dict[int, tuple[np.ndarray, np.ndarray]], t: Totals) -> dict[str, Any]:
    """`mass[level]`: per cell of the level (keys sorted), its tokens in the store and in the mixture."""
    selected = t.selected
    levels = {}
    for level in LEVELS:
        nat, mix = mass[level]
        p = nat / nat.sum()
        q = mix / selected if selected > 0 else np.zeros_like(mix)
        nz = q > 0
        h = _entropy(q)
        levels[level_name(level)] = {
            "cells": int(len(nat)), "cells_covered": int(nz.sum()),
            "entropy": round(h, 4), "effective_cells": round(math.exp(h), 2),
            "natural_effective_cells": round(math.exp(_entropy(p)), 2),
            "tv_to_natural": round(0.5 * float(np.abs(q - p).sum()), 4),
            "kl_to_natural": round(float((q[nz] * np.log(q[nz] / p[nz])).sum()), 4),
        }
    active = cells["target_tokens"] > 0
    pool = cells["eligible_docs"][active]
    mean_q = t.quality_tokens / t.quality_weight if t.quality_weight > 0 else None
    h_L = _entropy(w_L)
    d = {
        "budget_tokens": int(budget), "selected_tokens": int(selected),
        "unique_docs": t.unique_docs, "docs_in_store": t.docs,
        "stage1": {"cells": int(len(w_L)), "entropy": round(h_L, 4), "effective_cells": round(math.exp(h_L), 2),
                   "max_weight": round(float(w_L.max()), 4)},
        "levels": levels,
        "pool": {"level": spec.draw_level, "cells_with_target": int(active.sum()),
                 "median_eligible_docs": float(np.median(pool)) if len(pool) else 0.0,
                 "p10_eligible_docs": float(np.percentile(pool, 10)) if len(pool) else 0.0,
                 "share_cells_under_30": round(float((pool < SMALL_POOL).mean()), 4) if len(pool) else 0.0},
        "epochs": {"max": t.max_repeats,
                   "share_tokens_repeated": round(t.repeated / selected, 4) if selected else 0.0},
        "mean_quality": None if mean_q is None else round(mean_q, 4),
    }
    warn = []
    if d["pool"]["median_eligible_docs"] < SMALL_POOL:
        warn.append(f"small candidate pools: the median level-{spec.draw_level} cell has "
                    f"{d['pool']['median_eligible_docs']:g} eligible documents (under {SMALL_POOL})")
    if len(w_L) >= 4 and (w_L.max() > 0.5 or math.exp(h_L) < 0.1 * len(w_L)):
        warn.append(f"weights collapse: the largest L{spec.level} cell has {w_L.max():.0%} of the weight and the "
                    f"effective number of cells is {math.exp(h_L):.1f} of {len(w_L)}")
    if d["epochs"]["share_tokens_repeated"] > 0.25:
        warn.append(f"heavy repetition: {d['epochs']['share_tokens_repeated']:.0%} of the selected tokens are repeats "
                    f"(max {d['epochs']['max']} epochs)")
    d["_warnings"] = warn
    return d
