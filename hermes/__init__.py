"""hermes: label a corpus with a coarse-to-fine code (c1, c2, c3) and query it per granularity.

Python API (the CLI is a thin layer over these):

    import hermes
    result = hermes.run(["corpus.jsonl"], out="out/")        # fit + label + store
    substrate = hermes.fit(["corpus.jsonl"], out="out/")      # fit the substrate only
    hermes.label(["more.jsonl"], substrate="out/substrate", out="out2/")
    hermes.query("out/labels.duckdb", "SELECT * FROM cells_l1")
    hermes.mix("out/labels.duckdb", out="mix/", rule="uniform", to_level=2, eligible="top:0.3")
"""

__version__ = "0.1.0"

from hermes.api import cells, compare, export, fit, label, mix, query, run, sample_corpus  # noqa: E402

__all__ = ["__version__", "cells", "compare", "export", "fit", "label", "mix", "query", "run", "sample_corpus"]
