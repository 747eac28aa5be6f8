"""Shared fixtures: real documents from the bundled sample corpus, and one real `hermes run`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hermes.api import sample_corpus
from hermes.cli import app

# Small enough to keep the suite quick, large enough for every cell level to be populated.
N_DOCS = 300
# the end-to-end runs take the transformer (its window cut to 128 tokens): the static encoder, the
# default, has its own run in tests/test_static.py, and the README's main job runs it too
FAST = ["--encoder", "transformer", "--max-length", "128", "--quiet"]


@pytest.fixture(scope="session")
def sample_records() -> list[dict]:
    with gzip.open(sample_corpus(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(N_DOCS), f)]


def write_jsonl(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def invoke(*args: str):
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# A corpus with one of every bad record the reader must reject, after the good ones.
BAD_LINES = [
    "{not json",                                            # invalid JSON
    json.dumps({"id": "no-text", "body": "x"}),            # missing text field
    json.dumps({"id": "int-text", "text": 42}),            # text is not a string
    json.dumps({"id": "blank", "text": "  \n\t "}),        # whitespace only
    json.dumps([1, 2, 3]),                                  # not an object
]
INVALID_UTF8 = b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}\n'


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, sample_records):
    """One real `hermes run` on N_DOCS real documents plus bad records; shared by many tests."""
    root = tmp_path_factory.mktemp("e2e")
    corpus = write_jsonl(root / "corpus" / "a.jsonl", sample_records[:200], BAD_LINES)
    with open(corpus, "ab") as f:
        f.write(INVALID_UTF8)
    # second shard: the rest, plus a duplicate of a doc_id already in the first shard
    write_jsonl(root / "corpus" / "b.jsonl", sample_records[200:] + [sample_records[0]])
    out = root / "out"
    # sizes given (7 is the most 300 fit documents allow): the size rule would make 2/2/7 codewords
    # of 300 documents, too few cells for the mixing tests (tests/test_rvq.py checks the rule itself)
    result = invoke("run", root / "corpus", "--out", out, "--format", "json", "--codebook-sizes", "7,4,4", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    return {"root": root, "corpus": root / "corpus", "out": out, "db": out / "labels.duckdb",
            "summary": summary, "records": sample_records}


@pytest.fixture(scope="session")
def real_embeddings(sample_records):
    """Unit-norm embeddings of the sample documents from the real packaged model."""
    from hermes.embed import Embedder

    return Embedder(max_length=128, dtype="fp32").encode([r["text"] for r in sample_records])
