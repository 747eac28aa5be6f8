"""Export a mixture in the input formats of trainers.

Formats:
- `jsonl`, `parquet`: shards `part-00000.jsonl` (or `.parquet`) of the selected documents, one
  record per copy (`repeats` copies of each), shuffled with the seed; fields doc_id, text, source,
  cell.
- `hf`: the same records as a Hugging Face dataset saved with `save_to_disk` (`datasets.load_from_disk`).
- `megatron`: one JSONL file of documents per cell (`cells/<cell>.jsonl`, each selected document
  once) and `blend.txt`, the `weight prefix` pairs that Megatron-style `--data-path` blending
  expects, weights = each cell's share of the mixture's tokens; prefixes name the files that
  Megatron's `tools/preprocess_data.py --output-prefix cells/<cell>` writes (`<prefix>_text_document`).
  The blend repeats a cell by sampling it more often, so its file holds each document once.

The text is joined back from the corpus by doc_id: the store records its inputs and fields, and
export reads them again (or `corpus` when the corpus has moved).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hermes.errors import HermesError
from hermes.files import replacing
from hermes.read import Fields, discover, read_shard
from hermes.store import info_fields, store_info

FORMATS = ("jsonl", "parquet", "hf", "megatron")
FLUSH_EVERY = 20_000      # documents buffered before the per-cell files are appended to
RECORD_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                           ("cell", pa.string())])


def _mixture(path: Path) -> tuple[dict[str, Any], pa.Table, pa.Table]:
    for name in ("mixture.json", "manifest.parquet", "weights.parquet"):
        if not (path / name).is_file():
            raise HermesError(f"{path / name}: missing; {path} is not a mixture folder",
                              hint="pass a folder written by `hermes mix`")
    return (json.loads((path / "mixture.json").read_text()), pq.read_table(path / "manifest.parquet"),
            pq.read_table(path / "weights.parquet"))


class _Wanted:
    """The manifest's doc_ids found in corpus batches without a Python object per id: the ids'
    64-bit hashes (DuckDB's `hash`, within this process), sorted, looked up with np.searchsorted,
    and each hit checked against the id itself (two ids may share a hash). Memory: the manifest's
    Arrow column and 17 bytes per id."""

    def __init__(self, ids: pa.Array):
        self.ids = ids
        self._con = None
        hashes = self._hashes(ids)
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]
        self.found = np.zeros(len(ids), dtype=bool)

    def _hashes(self, ids) -> np.ndarray:
        import duckdb

        if self._con is None:
            self._con = duckdb.connect()
        self._con.register("ids", pa.table({"doc_id": ids}))
        try:
            return self._con.execute("SELECT hash(doc_id) AS h FROM ids").fetchnumpy()["h"].astype(np.uint64, copy=False)
        finally:
            self._con.unregister("ids")

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def first_hits(self, batch_ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the batch, manifest rows) of the batch's ids that the manifest holds and
        no earlier record had: the first record of each doc_id, in batch order."""
        h = self._hashes(batch_ids)
        lo, hi = np.searchsorted(self.sorted, h, "left"), np.searchsorted(self.sorted, h, "right")
        positions = np.flatnonzero(hi > lo)
        if not len(positions):
            return positions, positions
        lo, hi = lo[positions], hi[positions]
        # most ids have one candidate row: checked together; ids that share a hash, one by one
        single = hi - lo == 1
        rows = self.order[lo[single]]
        same = pc.equal(batch_ids.take(pa.array(positions[single])), self.ids.take(pa.array(rows)))
        keep = pc.fill_null(same, False).to_numpy(zero_copy_only=False) & ~self.found[rows]
        pos, rows = list(positions[single][keep]), list(rows[keep])
        first = np.unique(rows, return_index=True)[1] if rows else []      # an id twice in the batch: its first
        pos, rows = [pos[i] for i in sorted(first)], [rows[i] for i in sorted(first)]
        self.found[rows] = True
        many = np.flatnonzero(~single)
        names = batch_ids.take(pa.array(positions[many])).to_pylist()
        for p, name, a, b in zip(positions[many], names, lo[many], hi[many]):
            for row in self.order[a:b]:          # one row but where two manifest ids share a hash
                if not self.found[row] and self.ids[int(row)].as_py() == name:
                    self.found[row] = True
                    pos.append(p)
                    rows.append(row)
                    break
        order = np.argsort(pos, kind="stable")
        return np.asarray(pos, dtype=np.int64)[order], np.asarray(rows, dtype=np.int64)[order]


def _texts(manifest: pa.Table, corpus: list[str], fields: Fields):
    """Yield (manifest row, doc_id, text, source) for the manifest's documents, streaming the corpus once."""
    wanted = _Wanted(manifest.column("doc_id").combine_chunks())
    try:
        for shard in discover(corpus):
            for docs, _ in read_shard(shard, fields):
                positions, rows = wanted.first_hits(docs.column("doc_id").combine_chunks())
                if not len(positions):
                    continue
                take = pa.array(positions)
                ids, texts, sources = (docs.column(c).take(take).to_pylist() for c in ("doc_id", "text", "source"))
                yield from zip(rows.tolist(), ids, texts, sources)
    finally:
        wanted.close()
    missing = int((~wanted.found).sum())
    if missing:
        raise HermesError(f"{missing:,} of the mixture's {len(wanted.found):,} documents were not found in the corpus "
                          f"({', '.join(corpus[:3])})", hint="pass the corpus the store was built from with --corpus")


def export(mixture_dir: str | Path, fmt: str, out: str | Path, corpus: list[str] | None = None,
           docs_per_shard: int = 50_000, seed: int | None = None) -> dict[str, Any]:
    mixture_dir, out = Path(mixture_dir), Path(out)
    if fmt not in FORMATS:
        raise HermesError(f"unknown export format '{fmt}'", hint=f"valid formats: {', '.join(FORMATS)}")
    if docs_per_shard <= 0:
        raise HermesError(f"--docs-per-shard {docs_per_shard} must be positive")
    spec, manifest, weights = _mixture(mixture_dir)
    info = store_info(spec["store"])
    corpus = corpus or info.get("inputs") or []
    fields = info_fields(info)
    seed = spec["spec"]["seed"] if seed is None else seed
    with replacing(out) as (tmp,):
        tmp.mkdir()
        if fmt == "megatron":
            result = _megatron(manifest, weights, corpus, fields, tmp)
        else:
            result = _shuffled(manifest, corpus, fields, tmp, fmt, docs_per_shard, seed)
        (tmp / "export.json").write_text(json.dumps({"mixture": str(mixture_dir), "format": fmt, "seed": seed,
                                                     **result}, indent=2) + "\n")
    return {"out": str(out), "format": fmt, **result}


def _shuffled(manifest: pa.Table, corpus: list[str], fields: Fields, out: Path, fmt: str,
              docs_per_shard: int, seed: int) -> dict[str, Any]:
    """Two-pass shuffle in bounded memory: scatter copies to random buckets, then shuffle each."""
    repeats = manifest.column("repeats").to_numpy()
    cells = manifest.column("cell").combine_chunks()
    copies = int(repeats.sum())
    n_shards = max(1, -(-copies // docs_per_shard))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        buckets = [open(Path(scratch) / f"{i}.jsonl", "w", encoding="utf-8") for i in range(n_shards)]
        try:
            for row, doc_id, text, source in _texts(manifest, corpus, fields):
                line = json.dumps({"doc_id": doc_id, "text": text, "source": source, "cell": cells[row].as_py()},
                                  ensure_ascii=False) + "\n"
                for b in rng.integers(0, n_shards, repeats[row]):
                    buckets[b].write(line)
        finally:
            for b in buckets:
                b.close()
        files = []
        data_dir = out / "data" if fmt == "hf" else out
        data_dir.mkdir(exist_ok=True)
        for i in range(n_shards):
            with open(Path(scratch) / f"{i}.jsonl", encoding="utf-8") as fh:
                lines = fh.readlines()
            order = rng.permutation(len(lines))
            if fmt == "jsonl":
                path = data_dir / f"part-{i:05d}.jsonl"
                with open(path, "w", encoding="utf-8") as w:
                    w.writelines(lines[j] for j in order)
            else:
                path = data_dir / f"part-{i:05d}.parquet"
                pq.write_table(pa.Table.from_pylist([json.loads(lines[j]) for j in order], schema=RECORD_SCHEMA), path)
            files.append(path)
    if fmt == "hf":
        try:
            import datasets
        except ImportError:
            raise HermesError("--format hf needs the datasets package", hint="pip install datasets") from None
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_parquet([str(p) for p in files], cache_dir=str(out / ".cache"))
        ds.save_to_disk(str(out / "dataset"))
        shutil.rmtree(out / "data")
        shutil.rmtree(out / ".cache", ignore_errors=True)
        files = [out / "dataset"]
    return {"records": copies, "documents": len(manifest), "files": [str(p.relative_to(out)) for p in files]}


def _cell_file(cell: str) -> str:
    """A file-name-safe stem for a cell key (class names of fixed stages may hold any character)."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", cell)
    if safe == cell and not cell.startswith("."):
        return cell
    return f"{safe.lstrip('.')}-{hashlib.sha1(cell.encode()).hexdigest()[:8]}"


def _cell_order(cell: str) -> list:
    """Sort key: codes by number, class names by text."""
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in cell.split(".")]


def _megatron(manifest: pa.Table, weights: pa.Table, corpus: list[str], fields: Fields, out: Path) -> dict[str, Any]:
    cells = manifest.column("cell").combine_chunks()
    (out / "cells").mkdir()
    buffered: dict[str, list[str]] = {}
    pending = 0

    def flush() -> None:      # append per cell, so 100k cells never means 100k open files
        for cell, lines in buffered.items():
            with open(out / "cells" / f"{_cell_file(cell)}.jsonl", "a", encoding="utf-8") as h:
                h.writelines(lines)
        buffered.clear()

    for row, doc_id, text, source in _texts(manifest, corpus, fields):
        buffered.setdefault(cells[row].as_py(), []).append(
            json.dumps({"doc_id": doc_id, "text": text, "source": source}, ensure_ascii=False) + "\n")
        pending += 1
        if pending >= FLUSH_EVERY:
            flush()
            pending = 0
    flush()
    w = {c: t for c, t in zip(weights.column("cell").to_pylist(), weights.column("selected_tokens").to_pylist()) if t > 0}
    total = sum(w.values())
    lines = [f"{w[c] / total:.10f} cells/{_cell_file(c)}_text_document" for c in sorted(w, key=_cell_order)]
    (out / "blend.txt").write_text(" ".join(lines) + "\n")
    (out / "blend.json").write_text(json.dumps({c: w[c] / total for c in sorted(w)}, indent=1) + "\n")
    return {"cells": len(w), "documents": len(manifest), "files": ["blend.txt", "blend.json", "cells/"]}
