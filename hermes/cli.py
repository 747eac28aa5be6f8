"""The `hermes` command line: a thin layer over `hermes.api`. The app and its commands, in the
order `--help` lists them; the commands live in hermes.cli_label and hermes.cli_mix, what they
share in hermes.console.

Heavy libraries (torch, sentence-transformers, duckdb) are imported inside the commands, so
`hermes --help` answers at once.
"""

from __future__ import annotations

import sys

import typer

from hermes import cli_label, cli_mix
from hermes._version import __version__
from hermes.console import STATE

app = typer.Typer(
    name="hermes",
    help="Label a corpus with a coarse-to-fine code (c1, c2, c3) and query it per granularity.\n\n"
         "Example: hermes run --out hermes-out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also HERMES_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Label a corpus with a coarse-to-fine code (c1, c2, c3) and query it per granularity.

    Example: hermes run --out hermes-out
    """
    if debug:
        STATE["debug"] = True
    if version:
        typer.echo(f"hermes {__version__}")
        raise typer.Exit(0)


for command in (cli_label.run, cli_label.fit, cli_label.label, cli_mix.sql, cli_mix.cells, cli_mix.mix,
                cli_mix.compare, cli_mix.export, cli_mix.propose, cli_mix.optimize):
    app.command()(command)
app.command(name="eval")(cli_mix.eval_)
app.command()(cli_mix.report)
app.command(name="train-quality")(cli_label.train_quality)
app.command()(cli_label.distill)


def main() -> None:
    try:
        app()
    except BrokenPipeError:          # `hermes ... | head`: the reader left; not an error of ours
        import os as _os

        _os.dup2(_os.open(_os.devnull, _os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
