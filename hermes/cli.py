"""The `hermes` command line: a thin layer over `hermes.api`.

Heavy libraries (torch, sentence-transformers, duckdb) are imported inside the commands, so
`hermes --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from hermes._version import __version__
from hermes.cellkeys import LEVELS, level_name
from hermes.errors import HermesError

app = typer.Typer(
    name="hermes",
    help="Label a corpus with a coarse-to-fine code (c1, c2, c3) and query it per granularity.\n\n"
         "Example: hermes run --out hermes-out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": os.environ.get("HERMES_DEBUG", "") not in ("", "0")}


class Fmt(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


class SummaryFmt(str, Enum):
    text = "text"
    json = "json"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Level(str, Enum):
    l1 = "1"
    l2 = "2"
    l3 = "3"


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn known errors into one `Error: ...` line and exit 1; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HermesError as e:
            if _state["debug"]:
                raise
            _fail(str(e))
        except KeyboardInterrupt:
            typer.echo("Interrupted; finished shards are kept, rerun the same command to resume.", err=True)
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit, BrokenPipeError):
            raise
        except Exception as e:  # an error hermes did not anticipate: still one line unless --debug
            if _state["debug"]:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(f"unexpected {type(e).__name__}: {first} (hint: rerun with --debug for the traceback)")

    return wrapper


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also HERMES_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Label a corpus with a coarse-to-fine code (c1, c2, c3) and query it per granularity.

    Example: hermes run --out hermes-out
    """
    if debug:
        _state["debug"] = True
    if version:
        typer.echo(f"hermes {__version__}")
        raise typer.Exit(0)


# ------------------------------------------------------------------------------ options

ConfigOpt = typer.Option(None, "--config", help="YAML file overriding configs/default.yaml, or the name of a "
                                                "packaged config (source-first, three-learned).")
StagesOpt = typer.Option(None, "--stages", help="The stage stack for c1,c2,c3: learned | source | fasttext:FILE "
                                                "each (default: learned,learned,learned). e.g. source,learned,learned")
TextFieldOpt = typer.Option(None, "--text-field", help="Dotted path of the text field (default: text).")
IdFieldOpt = typer.Option(None, "--id-field", help="Dotted path of the id field (default: id).")
SourceFieldOpt = typer.Option(None, "--source-field", help="Dotted path of the source field (default: source).")
DeviceOpt = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps (default: auto).")
BatchOpt = typer.Option(None, "--batch-size", help="Documents per encoder call (default: 64).")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Local Hugging Face tokenizer folder for n_tokens "
                                                     "(default: the embedding model's).")
KeepOpt = typer.Option(None, "--keep-embeddings/--drop-embeddings",
                       help="Keep OUT/embeddings (float16 per shard) after the run (default: drop).")
QualityOpt = typer.Option(None, "--quality", help="Quality score: none | heuristic | field | fasttext "
                                                  "(default: heuristic).")
QualityModelOpt = typer.Option(None, "--quality-model", help="fastText classifier (.bin) whose label "
                                                             "probability is the score; implies --quality fasttext.")
QualityLabelOpt = typer.Option(None, "--quality-label", help="The fastText label scored (default: __label__hq).")
QualityFieldOpt = typer.Option(None, "--quality-field", help="Numeric record field (dotted path) to use as "
                                                             "the quality score; implies --quality field.")
class EncoderKind(str, Enum):
    transformer = "transformer"
    static = "static"


EncoderOpt = typer.Option(None, "--encoder", help="transformer: the model embeds every document (its first "
                                                  "--max-length tokens). static: a static encoder is built from the "
                                                  "model on --encoder-docs documents of the corpus, then embeds every "
                                                  "whole text, about 40x faster on 2 CPU cores (default: transformer).")
EncoderDocsOpt = typer.Option(None, "--encoder-docs", help="Documents the static encoder is built on, a seeded "
                                                           "sample (default: 2000).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")
EngineOpt = typer.Option(Engine.local, "--engine", help="local | ray (Ray Data, one task per shard).")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address HOST:PORT (with --engine ray; default: "
                          "start Ray on this machine).")
SummaryOpt = typer.Option(SummaryFmt.text, "--format", help="Summary as text or json (on stdout).")


CodebookSizeOpt = typer.Option(None, "--codebook-size", help="Codewords at every learned stage (at most fit sample "
                               "// min_points_per_code). Default: the size rule, from the corpus size (see "
                               "docs/guide.md, How a document gets its code).")
CodebookSizesOpt = typer.Option(None, "--codebook-sizes", help="Codewords per stage, e.g. 32,16,64 ('-' for a fixed "
                                "stage). Default: the size rule.")


def _sizes(text: str | None) -> list[int | None] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in ("-", "null", "none"):
            out.append(None)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise HermesError(f"--codebook-sizes {text}: {part!r} is not an integer",
                              hint="three sizes, e.g. 32,16,64 ('-' for a fixed stage)") from None
    return out


def _fit_overrides(model, dtype, max_length, codebook_size, fit_sample, seed, stages=None, encoder=None,
                   encoder_docs=None, codebook_sizes=None) -> dict[str, Any]:
    return {"model": model, "dtype": dtype, "max_length": max_length, "codebook_size": codebook_size,
            "codebook_sizes": _sizes(codebook_sizes),
            "fit_sample": fit_sample, "seed": seed, "stages": stages,
            "encoder": encoder.value if encoder is not None else None, "encoder_docs": encoder_docs}


def _embedding_text(e: dict[str, Any]) -> str:
    """How a summary names the encoder: the transformer's settings, or the static encoder's recipe."""
    if e.get("encoder") == "static":
        return (f"{e['model']} (built on {e['docs']:,} documents, seed {e['seed']}, SIF a={e['weighting']['a']:g}; "
                f"whole text)")
    return f"{e['model']} ({e['dtype']}, max_length {e['max_length']})"


def _read_overrides(text_field, id_field, source_field, device, batch_size, tokenizer, keep,
                    quality=None, quality_field=None, quality_model=None, quality_label=None) -> dict[str, Any]:
    return {"text_field": text_field, "id_field": id_field, "source_field": source_field, "device": device,
            "batch_size": batch_size, "tokenizer": tokenizer, "keep_embeddings": keep,
            "quality": quality, "quality_field": quality_field, "quality_model": quality_model,
            "quality_label": quality_label}


def _print_summary(summary: dict[str, Any], fmt: SummaryFmt) -> None:
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(summary, indent=2))
        return
    s = summary
    if s["command"] == "fit":
        typer.echo(f"hermes fit: substrate {s['fingerprint']} fitted on {s['fit_sample_size']:,} of "
                   f"{s['documents']:,} documents in {s['seconds']:.1f} s")
        typer.echo(f"  {s['codebook_rule']}")
        typer.echo(f"  stages: {s['stages']}")
        typer.echo(f"  embedding: {_embedding_text(s['embedding'])}")
        typer.echo(f"  rejected records: {s['rejected']:,}")
        typer.echo(f"  substrate: {s['substrate']}")
        typer.echo(f"next:\n  hermes label CORPUS... --substrate {s['substrate']} --out DIR")
        return
    if "appended" in s:
        a = s["appended"]
        typer.echo(f"hermes {s['command']} --append: added {a['labeled']:,} of {s['read']:,} documents read "
                   f"({a['shards']:,} shard{'' if a['shards'] == 1 else 's'}), in {s['seconds']:.1f} s ({s['docs_per_s']:,} docs/s); "
                   f"the store now holds {s['labeled']:,}")
    else:
        typer.echo(f"hermes {s['command']}: labeled {s['labeled']:,} of {s['read']:,} documents read, "
                   f"in {s['seconds']:.1f} s ({s['docs_per_s']:,} docs/s)")
    if s["rejected"]:
        reasons = ", ".join(f"{r}: {n:,}" for r, n in s["reject_reasons"].items())
        typer.echo(f"  rejected: {s['rejected']:,} ({reasons})")
    else:
        typer.echo("  rejected: 0")
    c = s["cells"]
    typer.echo(f"  cells: L1 {c['l1']:,}, L12 {c['l12']:,}, L123 {c['l123']:,}")
    e = s["embedding"]
    typer.echo(f"  substrate {s['substrate']}: {_embedding_text(e)}, "
               f"fitted on {s['fit_sample_size']:,} documents; {s['codebook_rule']}")
    typer.echo(f"  stages: {s['stages']}")
    typer.echo("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings"].items()))
    typer.echo("  outputs: " + ", ".join(f"{v} ({k})" for k, v in s["outputs"].items()))
    typer.echo("next:")
    for line in s["next"]:
        typer.echo(f"  {line}")


def _print_table(table, fmt: Fmt) -> None:
    if fmt == Fmt.json:
        typer.echo(json.dumps(table.to_pylist(), indent=1, default=str))
        return
    if fmt == Fmt.csv:
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(table.column_names)
        for row in table.to_pylist():
            w.writerow(["" if v is None else v for v in row.values()])
        return
    names = table.column_names
    rows = [[_cell_text(v) for v in r.values()] for r in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    typer.echo("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip())
    typer.echo("  ".join("-" * w for w in widths))
    for r in rows:
        typer.echo("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)).rstrip())
    typer.echo(f"({len(rows):,} rows)", err=True)


def _cell_text(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------ commands

@app.command()
@guarded
def run(
    inputs: Optional[List[str]] = typer.Argument(None, metavar="[INPUT]...",
                                                 help="Files, folders or globs; none = the bundled sample corpus."),
    out: Path = typer.Option(Path("hermes-out"), "--out", "-o", help="Output folder."),
    config: Optional[Path] = ConfigOpt,
    text_field: Optional[str] = TextFieldOpt,
    id_field: Optional[str] = IdFieldOpt,
    source_field: Optional[str] = SourceFieldOpt,
    encoder: Optional[EncoderKind] = EncoderOpt,
    encoder_docs: Optional[int] = EncoderDocsOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Local sentence-transformers folder, the teacher of "
                                                             "a static encoder (default: the packaged "
                                                             "all-MiniLM-L6-v2), or a static encoder folder that "
                                                             "hermes saved."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | bf16 | fp32 (default: auto)."),
    device: Optional[str] = DeviceOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens the transformer reads (default: 256); "
                                                                        "with --encoder static, the teacher's window "
                                                                        "while the encoder is built (it then reads "
                                                                        "whole texts)."),
    batch_size: Optional[int] = BatchOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    codebook_size: Optional[int] = CodebookSizeOpt,
    codebook_sizes: Optional[str] = CodebookSizesOpt,
    fit_sample: Optional[int] = typer.Option(None, "--fit-sample", help="Documents to fit on (default: 200000)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the fit sample and k-means (default: 0)."),
    stages: Optional[str] = StagesOpt,
    quality: Optional[str] = QualityOpt,
    quality_field: Optional[str] = QualityFieldOpt,
    quality_model: Optional[str] = QualityModelOpt,
    quality_label: Optional[str] = QualityLabelOpt,
    keep_embeddings: Optional[bool] = KeepOpt,
    engine: Engine = EngineOpt,
    address: Optional[str] = AddressOpt,
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """The main job: fit a substrate on a sample, label every document, build the store.

    Writes OUT/labels.duckdb, OUT/substrate/, OUT/labels/ (one Parquet file per input shard) and
    OUT/rejects/. With no INPUT it runs on the sample corpus bundled with hermes.

    A source first stage (one L1 cell per source, named by it, learned stages below):
    hermes run corpus/ --out out --stages source,learned,learned

    --engine ray embeds and labels the shards on Ray Data (on a cluster with --address); the
    substrate is fitted and the store built here.

    Example: hermes run corpus/*.jsonl.gz --out out --text-field text
    """
    from hermes import api

    overrides = {**_fit_overrides(model, dtype, max_length, codebook_size, fit_sample, seed, stages, encoder,
                                  encoder_docs, codebook_sizes),
                 **_read_overrides(text_field, id_field, source_field, device, batch_size, tokenizer,
                                   keep_embeddings, quality, quality_field, quality_model, quality_label)}
    summary = api.run(inputs, out=out, config=config, quiet=quiet, engine=engine.value, address=address, **overrides)
    _print_summary(summary, fmt)


@app.command()
@guarded
def fit(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", help="Files, folders or globs."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; the substrate goes to OUT/substrate."),
    config: Optional[Path] = ConfigOpt,
    text_field: Optional[str] = TextFieldOpt,
    id_field: Optional[str] = IdFieldOpt,
    source_field: Optional[str] = SourceFieldOpt,
    encoder: Optional[EncoderKind] = EncoderOpt,
    encoder_docs: Optional[int] = EncoderDocsOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Local sentence-transformers folder (the teacher of a "
                                                             "static encoder), or a static encoder folder that "
                                                             "hermes saved."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | bf16 | fp32 (default: auto)."),
    device: Optional[str] = DeviceOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens the transformer reads (default: 256); "
                                                                        "with --encoder static, the teacher's window "
                                                                        "while the encoder is built (it then reads "
                                                                        "whole texts)."),
    batch_size: Optional[int] = BatchOpt,
    codebook_size: Optional[int] = CodebookSizeOpt,
    codebook_sizes: Optional[str] = CodebookSizesOpt,
    fit_sample: Optional[int] = typer.Option(None, "--fit-sample", help="Documents to fit on (default: 200000)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default: 0)."),
    stages: Optional[str] = StagesOpt,
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Fit the substrate only (embedding settings, transform, RVQ codebooks) on a sample of INPUT.

    The embeddings stay in OUT/embeddings, so fitting again with other settings does not re-embed.

    Example: hermes fit corpus/ --out fitted --fit-sample 100000
    """
    from hermes import api

    overrides = {**_fit_overrides(model, dtype, max_length, codebook_size, fit_sample, seed, stages, encoder,
                                  encoder_docs, codebook_sizes),
                 **_read_overrides(text_field, id_field, source_field, device, batch_size, None, True)}
    summary = api.fit(inputs, out=out, config=config, quiet=quiet, **overrides)
    _print_summary(summary, fmt)


@app.command()
@guarded
def label(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", help="Files, folders or globs."),
    substrate: Path = typer.Option(..., "--substrate", "-s", help="A substrate folder from `hermes fit`/`run`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (labels.duckdb, labels/, rejects/)."),
    config: Optional[Path] = ConfigOpt,
    text_field: Optional[str] = TextFieldOpt,
    id_field: Optional[str] = IdFieldOpt,
    source_field: Optional[str] = SourceFieldOpt,
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    quality: Optional[str] = QualityOpt,
    quality_field: Optional[str] = QualityFieldOpt,
    quality_model: Optional[str] = QualityModelOpt,
    quality_label: Optional[str] = QualityLabelOpt,
    keep_embeddings: Optional[bool] = KeepOpt,
    engine: Engine = EngineOpt,
    address: Optional[str] = AddressOpt,
    append: bool = typer.Option(False, "--append", help="Add INPUT to the store already in --out (same "
                                "substrate) instead of rebuilding it from INPUT alone; shards it holds are skipped."),
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Label INPUT with an existing substrate and build the store. Resumable: rerun the same
    command after an interruption and only unfinished shards are done again.

    The embedding model, dtype and max length are the substrate's own. --engine ray runs the same
    per-shard function on Ray Data (on a cluster with --address); the store is built here. With
    --append the new shards' labels are added to the store in --out in one transaction, its rows
    untouched: a doc_id it holds already goes to rejects as a duplicate.

    Example: hermes label more/*.parquet --substrate out/substrate --out out-more
    """
    from hermes import api

    overrides = _read_overrides(text_field, id_field, source_field, device, batch_size, tokenizer, keep_embeddings,
                                quality, quality_field, quality_model, quality_label)
    summary = api.label(inputs, substrate=substrate, out=out, config=config, quiet=quiet, **overrides,
                        engine=engine.value, address=address, append=append)
    _print_summary(summary, fmt)


@app.command()
@guarded
def sql(
    statement: str = typer.Argument(..., metavar="SQL", help="One SELECT statement."),
    db: Path = typer.Option(..., "--db", help="A labels.duckdb store."),
    fmt: Fmt = typer.Option(Fmt.table, "--format", help="table | csv | json"),
) -> None:
    """Run one read-only query against the store; statements that write are refused (exit 1).

    Tables: labels, rejects, substrates. Views: cells_l1, cells_l12, cells_l123, cells.

    Example: hermes sql "SELECT cell, n_docs FROM cells_l12 ORDER BY n_docs DESC LIMIT 5" --db out/labels.duckdb
    """
    from hermes import api

    _print_table(api.query(db, statement), fmt)


@app.command()
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

    _print_table(api.cells(db, int(level.value), limit), fmt)


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
        _fail(f"{what} is empty", code=2)
    return items


@app.command()
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


@app.command()
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
        _fail(f"--levels {levels!r}: levels are 1, 2, 3, comma-separated", code=2)
    lv = [m for m in lv if m >= level] if all(m in LEVELS for m in lv) else lv
    result = api.compare(db, levels=lv, rules=_csv_list(rules, "--rules"), samplers=_csv_list(samplers, "--samplers"),
                         eligible=_csv_list(eligible, "--eligible"), level=level, budget_tokens=budget_tokens,
                         seed=seed, max_epochs=max_epochs, out=out)
    if fmt == Fmt.json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_table(pa.Table.from_pylist(result["mixtures"]), fmt)
    if fmt == Fmt.table:
        typer.echo("")
        _print_table(pa.Table.from_pylist(result["pairs"]), fmt)


class ExportFmt(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"
    hf = "hf"
    megatron = "megatron"


@app.command()
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


@app.command()
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


@app.command()
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


@app.command(name="eval")
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
    _print_table(pa.Table.from_pylist(rows), fmt)
    rec = [{"method": m, **{f"stage_{i + 1}": x for i, x in enumerate(v)}} for m, v in r["reconstruction"].items()]
    if fmt == Fmt.table:
        typer.echo("\nreconstruction error (mean squared residual) after each stage")
    _print_table(pa.Table.from_pylist(rec), fmt)
    grows = [{"gold": g, "level": lv, "method": m, **(v or {})} for g, d in r["gold"].items()
             for lv, x in d.items() for m, v in x.items()]
    if grows:
        if fmt == Fmt.table:
            typer.echo("")
        _print_table(pa.Table.from_pylist(grows), fmt)


@app.command()
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


@app.command(name="train-quality")
@guarded
def train_quality(
    positive: List[str] = typer.Option(..., "--positive", help="High-quality corpus (files, folders, globs; repeatable)."),
    negative: List[str] = typer.Option(..., "--negative", help="Low-quality corpus (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.bin and card.json."),
    text_field: str = typer.Option("text", "--text-field", help="Dotted path of the text field."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share of documents held out for the metrics."),
    epochs: int = typer.Option(5, "--epochs", help="fastText epochs."),
    lr: float = typer.Option(0.1, "--lr", help="fastText learning rate."),
    word_ngrams: int = typer.Option(2, "--word-ngrams", help="fastText word n-grams."),
    dim: int = typer.Option(64, "--dim", help="fastText vector size."),
    bucket: int = typer.Option(200_000, "--bucket", help="fastText hash buckets (model size)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N documents per side."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of fastText."),
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Train a fastText quality classifier from positive and negative corpora, with the same text
    normaliser used at prediction; report held-out precision, recall and AUC; write the model and
    a card (data, settings, metrics).

    Example: hermes train-quality --positive good/ --negative junk/ --out quality-model
    """
    from hermes import api

    r = api.train_quality(positive, negative, out, text_field=text_field, holdout=holdout, epochs=epochs, lr=lr,
                          word_ngrams=word_ngrams, dim=dim, bucket=bucket, seed=seed, limit=limit)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    m, d = r["metrics"], r["data"]
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
    typer.echo(f"hermes train-quality: {d['positive_docs']:,} positive, {d['negative_docs']:,} negative documents; "
               f"held out {m['holdout_docs']:,}: precision {m['precision']:.4f}, recall {m['recall']:.4f}, AUC {auc}")
    typer.echo(f"  wrote {r['out']}/model.bin and card.json; use: {r['use']}")


@app.command()
@guarded
def distill(
    db: Path = typer.Option(..., "--db", help="A labeled store (the teacher)."),
    out: Path = typer.Option(..., "--out", "-o", help="The distilled substrate folder to write."),
    corpus: Optional[List[str]] = typer.Option(None, "--corpus", help="The corpus, if it moved."),
    sample: int = typer.Option(200_000, "--sample", help="Documents to train on at most."),
    holdout: float = typer.Option(0.1, "--holdout", help="Share held out to measure agreement."),
    student: str = typer.Option("linear", "--student", help="linear (the teacher's tokens in its window, "
                                                             "mapped into the teacher's space by ridge "
                                                             "regression, quantized by its codebooks) | "
                                                             "fasttext (classifiers for c1, L12, L123)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs of the fasttext student "
                                                               "(default 25)."),
    substrate: Optional[Path] = typer.Option(None, "--substrate", help="The store's substrate, if not beside it "
                                                                       "(the linear student uses its codebooks)."),
    max_system: Optional[int] = typer.Option(None, "--max-system", help="The linear student's ridge system "
                                                                        "is at most this many rows square: "
                                                                        "memory 8 N^2 bytes (default 40,000: "
                                                                        "12.8 GB). Lower it on a smaller "
                                                                        "machine; token pairs, then token "
                                                                        "ids, are capped to fit."),
    seed: int = typer.Option(0, "--seed", help="Seed."),
    quiet: bool = QuietOpt,
    fmt: SummaryFmt = SummaryOpt,
) -> None:
    """Train a distilled fast labeler that predicts the store's code from text, saved as a substrate
    that `hermes label` accepts (no embedding model needed). The linear student (default) reads
    the teacher's tokens in the teacher's window, predicts each document's point in the teacher's
    transformed space from the TF-IDF of the tokens and of adjacent token pairs and from static
    and context token vectors (the context ones from one pass of the teacher's encoder over up to
    5,000 training documents), and quantizes it with the teacher's codebooks (the first learned
    stage by a decision rule fitted to the student's out-of-fold errors, the later ones from a
    second, less regularised prediction); the fasttext student classifies c1, the L12 and the L123
    cell. Reports held-out agreement with the store's substrate per level.

    Example: hermes distill --db out/labels.duckdb --out fast-substrate
    """
    from hermes import api

    r = api.distill(db, out, corpus, sample=sample, holdout=holdout, epochs=epochs, student=student, seed=seed,
                    substrate=substrate, max_system=max_system, quiet=quiet)
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(r, indent=2))
        return
    a = r["agreement"]
    typer.echo(f"hermes distill: {r['out']} ({r['student']} student, substrate {r['fingerprint']}, "
               f"teacher {r['teacher']}), trained on "
               f"{r['train_docs']:,} documents in {r['train_seconds']} s")
    typer.echo(f"  held-out agreement ({r['holdout_docs']:,} docs): L1 {a['L1']:.3f}, L12 {a['L12']:.3f}, "
               f"L123 {a['L123']:.3f}; {r['holdout_docs_per_s']:,} docs/s")
    typer.echo(f"next: hermes label CORPUS --substrate {r['out']} --out DIR")


def main() -> None:
    try:
        app()
    except BrokenPipeError:          # `hermes ... | head`: the reader left; not an error of ours
        import os as _os

        _os.dup2(_os.open(_os.devnull, _os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
