"""The commands over a store: `sql`, `cells`, `mix`, `compare`, `export`, `propose`, `optimize`,
`eval` and `report` (registered on the app in hermes.cli)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from hermes.cellkeys import LEVELS, level_name
from hermes.console import (Fmt, Level, QuietOpt, SummaryFmt, SummaryOpt, fail, guarded, print_table)


@guarded
def sql(
    statement: str = typer.Argument(..., metavar="SQL", help="One SELECT statement."),
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    fmt: Fmt = typer.Option(Fmt.table, "--format", help="table | csv | json"),
) -> None:
    """Run one read-only query against the store; statements that write are refused (exit 1).

    Tables: labels, rejects, substrates. Views: cells_l1, cells_l12, cells_l123, cells, cell_terms.

    Example: hermes sql "SELECT cell, n_docs FROM cells_l12 ORDER BY n_docs DESC LIMIT 5" --db out/labels.duckdb
    """
    from hermes import api

    print_table(api.query(db, statement), fmt)


@guarded
def cells(
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    level: Level = typer.Option(Level.l1, "--level", help="1 = L1, 2 = L12, 3 = L123."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the N largest cells."),
    fmt: Fmt = typer.Option(Fmt.table, "--format", help="table | csv | json"),
) -> None:
    """The group-by view of one granularity: one row per non-empty cell with sizes, shares,
    quality and number of children.

    Example: hermes cells --db out/labels.duckdb --level 2 --format json
    """
    from hermes import api

    print_table(api.cells(db, int(level.value), limit), fmt)


def _print_mixture(d: dict[str, Any]) -> None:
    s, g = d["spec"], d["diagnostics"]
    typer.echo(f"hermes mix: {level_name(s['level'])} {s['rule']} -> {level_name(s['to_level'])} {s['sampler']}, "
               f"eligible {s['eligible']}, seed {s['seed']}")
    typer.echo(f"  tokens: {g['selected_tokens']:,} selected for a budget of {g['budget_tokens']:,}; "
               f"{g['unique_docs']:,} of {g['docs_in_store']:,} documents")
    typer.echo(f"  stage 1: {g['stage1']['cells']:,} cells, effective {g['stage1']['effective_cells']:,}, "
               f"max weight {g['stage1']['max_weight']:.4f}")
    typer.echo("  level  cells  covered  effective  natural eff.  TV      KL")
    for name, lv in g["levels"].items():
        typer.echo(f"  {name:<5}  {lv['cells']:>5,}  {lv['cells_covered']:>7,}  {lv['effective_cells']:>9,.1f}  "
                   f"{lv['natural_effective_cells']:>12,.1f}  {lv['tv_to_natural']:.4f}  {lv['kl_to_natural']:.4f}")
    p = g["pool"]
    typer.echo(f"  candidate pools (level-{p['level']} cells): median {p['median_eligible_docs']:g} eligible docs, "
               f"p10 {p['p10_eligible_docs']:g}, {p['share_cells_under_30']:.0%} of cells under 30")
    q = "n/a" if g["mean_quality"] is None else f"{g['mean_quality']:.4f}"
    typer.echo(f"  epochs: max {g['epochs']['max']}, {g['epochs']['share_tokens_repeated']:.1%} of tokens repeated; "
               f"mean quality {q}")
    for w in d["warnings"]:
        typer.echo(f"  warning: {w}")
    typer.echo(f"  wrote {d['out']} (weights.parquet, manifest.parquet, mixture.json)")


def _csv_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        fail(f"{what} is empty", code=2)
    return items


@guarded
def mix(
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    out: Path = typer.Option(..., "--out", "-o", help="The mixture folder to write."),
    level: int = typer.Option(1, "--level", help="Stage-1 level L: 1, 2 or 3."),
    rule: str = typer.Option("natural", "--rule", help="natural | uniform | temperature:T | unimax:E | weights:FILE"),
    to_level: Optional[int] = typer.Option(None, "--to-level", help="Stage-2 level M >= L (default: L)."),
    sampler: str = typer.Option("proportional", "--sampler", help="proportional | equal (child mass in Stage 2)."),
    eligible: str = typer.Option("all", "--eligible", help="all | top:P (quality top fraction P of each level-M cell)."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Token budget (default: all tokens "
                                                                              "of the store)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the document draw."),
    max_epochs: Optional[float] = typer.Option(None, "--max-epochs", help="Cap on repeats per cell; the rest "
                                                                          "goes to the other cells. A budget "
                                                                          "beyond the cap is refused, naming the "
                                                                          "largest feasible one."),
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """One mixture: a Stage-1 rule over level-L cells, a Stage-2 sampler inside each of them down to
    level M, a token budget and a seed. Writes weights.parquet, manifest.parquet (doc_id, repeats, n_tokens, cell)
    and mixture.json (spec, substrate, diagnostics) to OUT.

    Example: hermes mix --db out/labels.duckdb --rule uniform --to-level 2 --eligible top:0.3 --out mix-u-l12
    """
    from hermes import api

    d = api.mix(db, out, level=level, rule=rule, to_level=to_level, sampler=sampler, eligible=eligible,
                budget_tokens=budget_tokens, seed=seed, max_epochs=max_epochs)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(d, indent=2))
    else:
        _print_mixture(d)


@guarded
def compare(
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    levels: str = typer.Option("1,2,3", "--levels", help="Stage-2 levels M to compare, e.g. 1,2,3."),
    rules: str = typer.Option("natural,uniform", "--rules", help="Stage-1 rules, comma-separated."),
    samplers: str = typer.Option("proportional,equal", "--samplers", help="Stage-2 samplers, comma-separated."),
    eligible: str = typer.Option("all", "--eligible", help="Eligibilities, e.g. all,top:0.3."),
    level: int = typer.Option(1, "--level", help="Stage-1 level L (levels below it are skipped)."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Token budget (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the document draws."),
    max_epochs: Optional[float] = typer.Option(None, "--max-epochs", help="Cap on repeats per cell."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write each mixture folder and "
                                                                 "compare.json under this folder."),
    fmt: Fmt = typer.Option(Fmt.table, "--format", help="table | csv | json"),
) -> None:
    """A grid of mixtures (levels x rules x samplers x eligibility): one row of diagnostics per
    mixture (effective cells, TV/KL to natural, candidate pools, epochs, quality), then pairwise
    distances (TV at L1, Jaccard of selected documents).

    Example: hermes compare --db out/labels.duckdb --levels 1,2,3 --rules natural,uniform --samplers proportional,equal --eligible all,top:0.3
    """
    import pyarrow as pa

    from hermes import api

    try:
        lv = [int(x) for x in _csv_list(levels, "--levels")]
    except ValueError:
        fail(f"--levels {levels!r}: levels are 1, 2, 3, comma-separated", code=2)
    lv = [m for m in lv if m >= level] if all(m in LEVELS for m in lv) else lv
    result = api.compare(db, levels=lv, rules=_csv_list(rules, "--rules"), samplers=_csv_list(samplers, "--samplers"),
                         eligible=_csv_list(eligible, "--eligible"), level=level, budget_tokens=budget_tokens,
                         seed=seed, max_epochs=max_epochs, out=out)
    if fmt == Fmt.json:
        typer.echo(json.dumps(result, indent=2))
        return
    print_table(pa.Table.from_pylist(result["mixtures"]), fmt)
    if fmt == Fmt.table:
        typer.echo("")
        print_table(pa.Table.from_pylist(result["pairs"]), fmt)


class ExportFmt(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"
    hf = "hf"
    megatron = "megatron"


@guarded
def export(
    mixture: Path = typer.Argument(..., metavar="MIXTURE", help="A mixture folder from `hermes mix`."),
    fmt: ExportFmt = typer.Option(..., "--format", help="jsonl | parquet | hf | megatron"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="Where the corpus is now, if it moved "
                                                                       "(default: the inputs the store records)."),
    docs_per_shard: int = typer.Option(50_000, "--docs-per-shard", help="Records per output shard (jsonl, parquet)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Shuffle seed (default: the mixture's seed)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """A mixture in a trainer's input format, with the text joined back from the corpus by doc_id.

    jsonl/parquet: shuffled shards of the selected documents, repeats honoured; hf: the same as a
    Hugging Face dataset on disk; megatron: one JSONL file per cell plus blend.txt with the
    `weight prefix` pairs of Megatron-style --data-path blending.

    Example: hermes export mix-u-l12 --format jsonl --out mix-u-l12-jsonl
    """
    from hermes import api

    r = api.export(mixture, fmt.value, out, corpus, docs_per_shard, seed)
    if json_out:
        typer.echo(json.dumps(r, indent=2))
    else:
        what = f"{r['records']:,} records of {r['documents']:,} documents" if "records" in r else \
            f"{r['documents']:,} documents in {r['cells']:,} cells"
        typer.echo(f"hermes export: {what} as {r['format']} in {r['out']}")


@guarded
def propose(
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for candidates/, candidates.json, losses.csv."),
    n: int = typer.Option(32, "--n", help="Number of candidate mixtures."),
    level: int = typer.Option(1, "--level", help="Level whose cells are weighted: 1, 2 or 3."),
    seed: int = typer.Option(0, "--seed", help="Seed of the Dirichlet draws."),
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Propose N candidate mixtures for proxy runs: Dirichlet draws around the natural distribution,
    the N most spread out kept (candidate 0 is natural). Each is a weights file for
    `hermes mix --rule weights:FILE`; fill OUT/losses.csv with the proxy losses, then run `hermes optimize`.

    Example: hermes propose --db out/labels.duckdb --n 32 --out proxy
    """
    from hermes import api

    r = api.propose(db, out, n=n, level=level, seed=seed)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    tv = [c["tv_to_natural"] for c in r["candidates"]]
    typer.echo(f"hermes propose: {r['n']} candidates over {r['cells']:,} {level_name(level)} cells in {r['out']}/candidates "
               f"(TV to natural {min(tv):.3f} to {max(tv):.3f})")
    typer.echo(f"next: build each with hermes mix --db {db} --rule weights:{r['out']}/candidates/cand-000.csv "
               f"--out ..., train proxies, fill {r['losses_template']}, then hermes optimize --candidates {r['out']} "
               f"--losses {r['losses_template']} --out best.csv")


@guarded
def optimize(
    out: Path = typer.Option(..., "--out", "-o", help="The weights file to write (CSV: cell, weight; with "
                             "--weights, keyed by its weight columns), with the report beside it (.json)."),
    candidates: Optional[Path] = typer.Option(None, "--candidates", help="The folder `hermes propose` wrote "
                                              "(or use --weights)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A weights table instead of --candidates: CSV "
                                           "with a run id column, then one weight per domain or cell."),
    losses: Path = typer.Option(..., "--losses", help="With --candidates: its losses.csv (candidate, loss). With "
                                "--weights: a CSV joined to it on the run id, one column per loss."),
    target: Optional[str] = typer.Option(None, "--target", help="With --weights: the loss column to minimise, "
                                         "e.g. metric/the_pile_pile_cc_val_loss."),
    run_column: Optional[str] = typer.Option(None, "--run-column", help="The run id column of the tables "
                                             "(default: the first column)."),
    rank: Optional[Path] = typer.Option(None, "--rank", help="Planned mixtures to score (CSV in the shape of "
                                        "--weights: run id, then the same weight columns)."),
    rank_out: Optional[Path] = typer.Option(None, "--rank-out", help="Where to write run,predicted_loss for each "
                                            "--rank mixture, best predicted first."),
    rank_losses: Optional[Path] = typer.Option(None, "--rank-losses", help="Measured losses of the --rank "
                                               "mixtures (same shape as --losses): report the held-out Spearman."),
    model: str = typer.Option("ridge", "--model", help="ridge | gbm (scikit-learn regressors)."),
    n_search: int = typer.Option(100_000, "--n-search", help="Dirichlet draws searched on the simplex."),
    seed: int = typer.Option(0, "--seed", help="Seed of the search and cross-validation."),
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Fit a regression from mixture weights to proxy loss, report its cross-validated held-out
    error, search the simplex and write the predicted-best mixture as a weights file.

    The proxy runs come from a `propose` folder, or from two tables joined on a run id, as RegMix
    published its runs. --rank scores planned mixtures before any is trained.

    Example: hermes optimize --candidates proxy --losses proxy/losses.csv --out best.csv

    Example: hermes optimize --weights train_mixture_1m.csv --losses train_pile_loss_1m.csv
    --target metric/the_pile_pile_cc_val_loss --model gbm --rank test_mixture_60m.csv
    --rank-losses test_pile_loss_60m.csv --rank-out ranked.csv --out best.csv
    """
    from hermes import api

    r = api.optimize(candidates, losses, out, model=model, n_search=n_search, seed=seed, weights=weights,
                     target=target, run_column=run_column, rank=rank, rank_out=rank_out, rank_losses=rank_losses)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    h = r["held_out"]
    sp = "n/a" if h["spearman"] is None else f"{h['spearman']:.3f}"
    typer.echo(f"hermes optimize: {r['model']} on {r['n_losses']} proxy losses; held-out ({h['folds']}-fold) "
               f"MAE {h['mae']:.4g}, RMSE {h['rmse']:.4g} (loss std {h['loss_std']:.4g}), Spearman {sp}")
    typer.echo(f"  predicted loss of the best mixture {r['predicted_loss']:.4g} (best measured: "
               f"{r['best_measured']['run']} {r['best_measured']['loss']:.4g}); TV to the {r['search_center']} "
               f"{r['tv_to_center']}")
    if "rank" in r:
        k = r["rank"]
        b = k["best_predicted"]
        typer.echo(f"  ranked {k['runs']} mixtures into {k['file']}; predicted best: run {b['run']}")
        if "held_out" in k:
            s = k["held_out"]["spearman"]
            typer.echo(f"  held-out on the ranked runs' measured losses: Spearman "
                       f"{'n/a' if s is None else f'{s:.3f}'}; the predicted best measured "
                       f"{b['measured_loss']:.4g}, rank {b['measured_rank']} of {k['runs']} "
                       f"(best {b['best_measured_loss']:.4g})")
    if r["level"]:          # weights by cell of a store: ready for the weights rule
        typer.echo(f"  wrote {r['weights']}; use it with: hermes mix --rule weights:{r['weights']} "
                   f"--level {r['level']} ...")
    else:                   # weights by the tables' columns (domains, say)
        typer.echo(f"  wrote {r['weights']} (weight by column of --weights)")


@guarded
def eval_(
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store (its substrate/ beside it)."),
    gold: Optional[str] = typer.Option(None, "--gold", help="Gold label fields of the corpus, comma-separated "
                                                            "dotted paths, e.g. labels.l1,labels.l2."),
    sample: int = typer.Option(20_000, "--sample", help="Documents evaluated (a seeded sample)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and the baselines."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="The corpus, if it moved."),
    substrate: Optional[Path] = typer.Option(None, "--substrate", help="Substrate folder (default: beside the store)."),
    quiet: bool = QuietOpt,
    fmt: Fmt = typer.Option(Fmt.table, "--format", help="table | csv | json"),
) -> None:
    """Clustering metrics per level (effective cells, entropy, Gini, mean cosine to centroid,
    Recall@10, reconstruction error per stage) for the store's code, a k-means-only RVQ and flat
    k-means with as many cells, on the same embeddings; with --gold, NMI, ARI, homogeneity,
    completeness and purity against each gold field.

    Example: hermes eval --db out/labels.duckdb --gold labels.l1,leaf
    """
    import pyarrow as pa

    from hermes import api

    r = api.evaluate(db, _csv_list(gold, "--gold") if gold else None, sample, seed, corpus, substrate, quiet)
    if fmt == Fmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    rows = [{"level": lv, "method": m, **v} for lv, d in r["levels"].items() for m, v in d.items()]
    print_table(pa.Table.from_pylist(rows), fmt)
    rec = [{"method": m, **{f"stage_{i + 1}": x for i, x in enumerate(v)}} for m, v in r["reconstruction"].items()]
    if fmt == Fmt.table:
        typer.echo("\nreconstruction error (mean squared residual) after each stage")
    print_table(pa.Table.from_pylist(rec), fmt)
    grows = [{"gold": g, "level": lv, "method": m, **(v or {})} for g, d in r["gold"].items()
             for lv, x in d.items() for m, v in x.items()]
    if grows:
        if fmt == Fmt.table:
            typer.echo("")
        print_table(pa.Table.from_pylist(grows), fmt)


@guarded
def report(
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML file to write."),
    mixture: Optional[List[Path]] = typer.Option(None, "--mixture", "-m", help="A mixture folder (repeatable)."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="The corpus for snippets, if it moved."),
) -> None:
    """A self-contained HTML page (no network): corpus summary, the hierarchy as a zoomable treemap
    (sized by tokens, coloured by quality, named by top terms), cell sizes and top:0.3 pools per
    level, each mixture's L1 weights beside natural with its diagnostics, and example snippets.

    Example: hermes report --db out/labels.duckdb --mixture mix-u-l12 --out report.html
    """
    from hermes import api

    r = api.report(db, out, mixture or [], corpus)
    typer.echo(f"hermes report: {r['out']} ({r['bytes'] / 1e6:.2f} MB, {r['l1_cells']} L1 cells, "
               f"{r['mixtures']} mixtures)")
