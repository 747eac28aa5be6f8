"""Where a run writes under its output folder, and the embedding cache in it.

    OUT/embeddings/<shard>.docs.parquet   the cached document columns (DOCS_SCHEMA)
    OUT/embeddings/<shard>.emb.f16        the cached embeddings, raw float16 (n, dim)
    OUT/embeddings/<shard>.done.json      the marker: the settings the cache was made with, its shape
    OUT/embeddings/<shard>.classes.parquet  the taxonomy stages' class of each cached document
    OUT/rejects/<shard>.parquet, OUT/labels/<shard>.parquet (+ labels/_done/), OUT/terms/<shard>.parquet
    OUT/substrate/, OUT/encoder/, OUT/labels.duckdb, OUT/run.log

A file is complete once its marker is there (files.replacing writes under a temporary name).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hermes.errors import HermesError
from hermes.models import Models, reading_fields
from hermes.read import Shard, read_shard
from hermes.static import NO_TOKENS

# Set by an engine's worker process (hermes.engines): the Ray node it runs on, logged with each line.
WORKER: dict[str, str] = {}


DOCS_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("n_chars", pa.int32()), ("n_tokens", pa.int32()),
    ("quality", pa.float64()), ("file", pa.string()), ("line", pa.int64()), ("seq", pa.int64()),
    ("read", pa.int64()),      # the document's position among the shard's documents read (the fit sample's key)
])


@dataclass
class Layout:
    """Where a run writes, under one output folder."""

    root: Path

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def substrate(self) -> Path:
        return self.root / "substrate"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder"       # a static encoder built by run/fit (copied into the substrate)

    @property
    def db(self) -> Path:
        return self.root / "labels.duckdb"

    def docs_file(self, shard: Shard) -> Path:
        return self.embeddings / f"{shard.key}.docs.parquet"

    def emb_file(self, shard: Shard) -> Path:
        return self.embeddings / f"{shard.key}.emb.f16"     # raw float16 (n, dim); shape in the marker

    def emb_marker(self, shard: Shard) -> Path:
        return self.embeddings / f"{shard.key}.done.json"

    def reject_file(self, shard: Shard) -> Path:
        return self.rejects / f"{shard.key}.parquet"

    def label_file(self, shard: Shard) -> Path:
        return self.labels / f"{shard.key}.parquet"

    def classes_file(self, shard: Shard) -> Path:
        return self.embeddings / f"{shard.key}.classes.parquet"   # taxonomy stages' labels, per document

    def unknown_file(self, shard: Shard) -> Path:
        return self.rejects / f"{shard.key}.unknown.parquet"      # documents of a class the substrate lacks

    def terms_file(self, shard: Shard) -> Path:
        return self.root / "terms" / f"{shard.key}.parquet"

    @property
    def run_log(self) -> Path:
        return self.root / "run.log"

    def log(self, step: str, result: "ShardResult", seconds: float) -> None:
        """One JSON line per shard and step in OUT/run.log (appended, so relaunches show too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.run_log, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
                                "shard": result.shard.name, "docs": result.n_docs, "rejects": result.n_rejects,
                                "skipped": result.skipped, "seconds": round(seconds, 3), **WORKER}) + "\n")

    def label_marker(self, shard: Shard) -> Path:
        return self.labels / "_done" / f"{shard.key}.json"


@dataclass
class ShardResult:
    shard: Shard
    n_docs: int
    n_rejects: int
    skipped: bool


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def open_embeddings(emb_file: Path) -> np.ndarray:
    """A cached embedding file as a read-only (n, dim) float16 memory map; shape from its marker."""
    marker = read_marker(emb_file.with_name(emb_file.name.replace(".emb.f16", ".done.json")))
    if not marker or "dim" not in marker:
        raise HermesError(f"{emb_file}: no marker with its shape beside it", hint="delete the embeddings folder and rerun")
    n, dim = marker["n_docs"], marker["dim"]
    if n == 0:
        return np.zeros((0, dim), np.float16)
    return np.memmap(emb_file, dtype=np.float16, mode="r", shape=(n, dim))


def cached_embeddings(folder: Path, wanted: list[str]) -> np.ndarray | None:
    """The kept embeddings (float32) of the documents `wanted`, from a run's embeddings/ folder, in
    that order; None unless all of them are there."""
    if not folder.is_dir():
        return None
    index = {d: i for i, d in enumerate(wanted)}
    out: np.ndarray | None = None
    found = 0
    for docs_file in sorted(folder.glob("*.docs.parquet")):
        ids = pq.read_table(docs_file, columns=["doc_id"]).column("doc_id").to_pylist()
        hits = [(i, index[d]) for i, d in enumerate(ids) if d in index]
        if not hits:
            continue
        emb = open_embeddings(Path(str(docs_file).replace(".docs.parquet", ".emb.f16")))
        if out is None:
            out = np.zeros((len(wanted), emb.shape[1]), dtype=np.float32)
        src, dst = zip(*hits)
        out[list(dst)] = emb[list(src)]
        found += len(hits)
    return out if out is not None and found >= len(wanted) else None


def load_cached_embeddings(shard: Shard, layout: Layout, mmap: bool = False) -> np.ndarray:
    emb = open_embeddings(layout.emb_file(shard))
    return emb if mmap else np.array(emb)


def drop_cached_embeddings(shard: Shard, layout: Layout) -> None:
    for p in (layout.emb_file(shard), layout.docs_file(shard), layout.emb_marker(shard), layout.classes_file(shard)):
        p.unlink(missing_ok=True)


def cached_texts(shard: Shard, models: Models, n: int, layout: Layout) -> Iterator[list[str]]:
    """The texts of a shard's n cached documents, read again in the same order (cheap next to
    embedding), batch by batch; an error at the end if the file no longer gives those n documents.
    Documents the static encoder rejected (no known token) are not in the cache, so not here."""
    skip = None
    if models.static and layout.reject_file(shard).is_file():
        rejected = pq.read_table(layout.reject_file(shard), columns=["line", "doc_id", "reason"])
        rejected = rejected.filter(pc.equal(rejected.column("reason"), NO_TOKENS))
        skip = rejected if rejected.num_rows else None
    seen = 0
    for batch, _ in read_shard(shard, reading_fields(models.cfg), models.cfg.read_batch_size):
        if skip is not None:      # by line (a doc_id may repeat in a shard); by doc_id for .txt files
            hit = pc.if_else(pc.is_null(batch.column("line")),
                             pc.is_in(batch.column("doc_id"), value_set=skip.column("doc_id")),
                             pc.is_in(batch.column("line"), value_set=skip.column("line").drop_null()))
            batch = batch.filter(pc.invert(hit))
        texts = batch.column("text").to_pylist()
        seen += len(texts)
        if seen > n:
            break
        yield texts
    if seen != n:
        now = f"more than {n}" if seen > n else f"{seen}"
        raise HermesError(f"{shard.path}: the file changed since it was first read ({now} documents now, {n} before)",
                          hint="rerun the command")
