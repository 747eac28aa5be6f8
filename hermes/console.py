"""What every `hermes` command shares: one-line errors (`guarded`), the options several commands
take, the settings they pass to `hermes.api`, and the printing of summaries and tables.

Heavy libraries (torch, sentence-transformers, duckdb) are imported inside the commands, so
`hermes --help` answers at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from typing import Any, Callable

import typer

from hermes.errors import HermesError
from hermes.files import out_of_room

STATE = {"debug": os.environ.get("HERMES_DEBUG", "") not in ("", "0")}


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


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Turn known errors into one `Error: ...` line and exit 1; a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HermesError as e:
            if STATE["debug"]:
                raise
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("Interrupted; finished shards are kept, rerun the same command to resume.", err=True)
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit, BrokenPipeError):
            raise
        except Exception as e:  # an error hermes did not anticipate: still one line unless --debug
            if STATE["debug"]:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            if out_of_room(e):       # a full disk while writing shard files: what was written is kept
                fail(f"no room to write ({first[:300]}); free space, then rerun the same command: finished shards "
                     f"are kept")
            fail(f"unexpected {type(e).__name__}: {first} (hint: rerun with --debug for the traceback)")

    return wrapper


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
    static = "static"
    transformer = "transformer"


EncoderOpt = typer.Option(None, "--encoder", help="static: a static encoder is built from the model on "
                                                  "--encoder-docs documents of the corpus, then embeds every whole "
                                                  "text, about 75x faster on 2 CPU cores. transformer: the model "
                                                  "embeds every document (its first --max-length tokens) "
                                                  "(default: static).")
DtypeOpt = typer.Option(None, "--dtype", help="auto | bf16 | fp32 (default: auto).")
MaxLengthOpt = typer.Option(None, "--max-length", help="Tokens the transformer reads (default: 256); with the static "
                                                       "encoder (the default), the teacher's window while the encoder "
                                                       "is built (it then reads whole texts).")
FitSampleOpt = typer.Option(None, "--fit-sample", help="Documents to fit on (default: 200000).")
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


def codebook_sizes_of(text: str | None) -> list[int | None] | None:
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


def fit_settings(model, dtype, max_length, codebook_size, fit_sample, seed, stages=None, encoder=None,
                   encoder_docs=None, codebook_sizes=None) -> dict[str, Any]:
    return {"model": model, "dtype": dtype, "max_length": max_length, "codebook_size": codebook_size,
            "codebook_sizes": codebook_sizes_of(codebook_sizes),
            "fit_sample": fit_sample, "seed": seed, "stages": stages,
            "encoder": encoder.value if encoder is not None else None, "encoder_docs": encoder_docs}


def embedding_text(e: dict[str, Any]) -> str:
    """How a summary names the encoder: the transformer's settings, or the static encoder's recipe."""
    if e.get("encoder") == "static":
        return (f"{e['model']} (built on {e['docs']:,} documents, seed {e['seed']}, SIF a={e['weighting']['a']:g}; "
                f"whole text)")
    return f"{e['model']} ({e['dtype']}, max_length {e['max_length']})"


def read_settings(text_field, id_field, source_field, device, batch_size, tokenizer, keep,
                    quality=None, quality_field=None, quality_model=None, quality_label=None) -> dict[str, Any]:
    return {"text_field": text_field, "id_field": id_field, "source_field": source_field, "device": device,
            "batch_size": batch_size, "tokenizer": tokenizer, "keep_embeddings": keep,
            "quality": quality, "quality_field": quality_field, "quality_model": quality_model,
            "quality_label": quality_label}


def print_summary(summary: dict[str, Any], fmt: SummaryFmt) -> None:
    if fmt == SummaryFmt.json:
        typer.echo(json.dumps(summary, indent=2))
        return
    s = summary
    if s["command"] == "fit":
        typer.echo(f"hermes fit: substrate {s['fingerprint']} fitted on {s['fit_sample_size']:,} of "
                   f"{s['documents']:,} documents in {s['seconds']:.1f} s")
        typer.echo(f"  {s['codebook_rule']}")
        typer.echo(f"  stages: {s['stages']}")
        typer.echo(f"  embedding: {embedding_text(s['embedding'])}")
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
    typer.echo(f"  substrate {s['substrate']}: {embedding_text(e)}, "
               f"fitted on {s['fit_sample_size']:,} documents; {s['codebook_rule']}")
    typer.echo(f"  stages: {s['stages']}")
    typer.echo("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings"].items()))
    typer.echo("  outputs: " + ", ".join(f"{v} ({k})" for k, v in s["outputs"].items()))
    typer.echo("next:")
    for line in s["next"]:
        typer.echo(f"  {line}")


def print_table(table, fmt: Fmt) -> None:
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
