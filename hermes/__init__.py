"""hermes: label a corpus with a coarse-to-fine code (c1, c2, c3) and query it per granularity.

Python API (the CLI is a thin layer over these):

    import hermes
    result = hermes.run(["corpus.jsonl"], out="out/")        # fit + label + store
    substrate = hermes.fit(["corpus.jsonl"], out="out/")      # fit the substrate only
    hermes.label(["more.jsonl"], substrate="out/substrate", out="out2/")
    hermes.query("out/labels.duckdb", "SELECT * FROM cells_l1")
    hermes.mix("out/labels.duckdb", out="mix/", rule="uniform", to_level=2, eligible="top:0.3")

`import hermes` is light: the API (and numpy, pyarrow, duckdb behind it) loads on first use of
one of these names.
"""

from hermes._version import __version__

__all__ = ["__version__", "cells", "compare", "export", "fit", "label", "mix", "query", "run", "sample_corpus"]


def __getattr__(name: str):
    if name in __all__:
        from hermes import api

        return getattr(api, name)
    raise AttributeError(f"module 'hermes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
