"""The per-shard work of labeling, and the fit in between.

    embed_shard:    read -> n_chars, n_tokens -> embed     -> embeddings/<shard>.{docs.parquet,npy}
                                                             + rejects/<shard>.parquet
    fit_substrate:  a seeded sample of the cached embeddings -> transform + RVQ -> substrate/
    quantize_shard: cached embeddings -> codes              -> labels/<shard>.parquet

Each per-shard function is idempotent: it writes under a temporary name, renames when the shard
is complete, and records a marker naming the settings it ran with, so a rerun skips what is done
and redoes what changed. Embeddings are cached as float16 and the codes are always computed from
those float16 values, so labeling straight after embedding and labeling from the cache agree.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hermes._version import __version__
from hermes.config import Config
from hermes.embed import Embedder, TokenCounter, resolve_device, resolve_dtype
from hermes.errors import HermesError
from hermes.files import replacing, write_json, write_parquet
from hermes.progress import Progress
from hermes.read import Fields, Shard, read_shard
from hermes.stages import file_id
from hermes.static import NO_TOKENS, StaticEncoder
from hermes.store import LABEL_FILE_SCHEMA, REJECT_FILE_SCHEMA
from hermes.substrate import Substrate

N_CODES = 3          # the store holds c1, c2, c3
QUANTIZE_BATCH = 16384   # documents per quantizer call from the embedding cache
ENCODE_SLICE = 512   # documents per encoder call from embed_shard (the encoder sorts each by length)

DOCS_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("source", pa.string()), ("n_chars", pa.int32()), ("n_tokens", pa.int32()),
    ("quality", pa.float64()), ("file", pa.string()), ("line", pa.int64()), ("seq", pa.int64()),
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
                                "skipped": result.skipped, "seconds": round(seconds, 3)}) + "\n")

    def label_marker(self, shard: Shard) -> Path:
        return self.labels / "_done" / f"{shard.key}.json"


class Stages:
    """The models the per-shard functions use, loaded once per process on first use."""

    def __init__(self, cfg: Config, embedding: dict[str, Any] | None = None,
                 stack: list[dict[str, Any]] | None = None, encoder_dir: Path | None = None):
        from hermes.stages import FixedLabelers

        self.cfg = cfg
        self.stack = stack or cfg.stages               # a substrate's own stack when labeling with it
        self.fixed = FixedLabelers(self.stack)
        emb = embedding or {}
        self.embedder: Embedder | StaticEncoder
        if emb.get("encoder") == "static":            # a substrate's static encoder, checked against it
            self.embedder = StaticEncoder.of_substrate(emb, encoder_dir)
        else:
            self.embedder = Embedder(model=emb.get("model", cfg.model), dtype=emb.get("dtype", cfg.dtype),
                                     device=cfg.device, max_length=emb.get("max_length", cfg.max_length),
                                     batch_size=cfg.batch_size)
        self._counter: TokenCounter | None = None
        self._scorer = None

    @property
    def quality_scorer(self):
        """The fastText scorer when quality = fasttext (loaded once), else None."""
        if self.cfg.quality == "fasttext" and self._scorer is None:
            from hermes.fasttext_quality import FastTextScorer

            self._scorer = FastTextScorer(self.cfg.quality_model, self.cfg.quality_label).setup()
        return self._scorer

    @property
    def static(self) -> bool:
        return isinstance(self.embedder, StaticEncoder)

    def use_static(self, folder: Path) -> None:
        """Embed with the static encoder in `folder` (built for this run, or given as --model)."""
        self.embedder = StaticEncoder(folder).setup()

    @property
    def counter(self) -> TokenCounter | StaticEncoder:
        """What counts n_tokens: the --tokenizer, else the encoder's own tokenizer (with a static
        encoder, its token ids serve both the count and the vector: one tokenization)."""
        if self.counts_with_encoder:
            return self.embedder
        if self._counter is None:
            self._counter = TokenCounter(self.cfg.tokenizer or self.embedder.tokenizer_path).setup()
        return self._counter

    @property
    def counts_with_encoder(self) -> bool:
        return self.static and not self.cfg.tokenizer

    def embedding_settings(self) -> dict[str, Any]:
        """The settings that decide the embeddings (the resolved dtype, not 'auto'); a static
        encoder's are its recipe and checksum."""
        if self.static:
            return self.embedder.settings()
        device = resolve_device(self.embedder.device)
        return {"model": self.embedder.model, "dtype": resolve_dtype(self.embedder.dtype, device),
                "max_length": self.embedder.max_length}

    def cache_key(self) -> str:
        """What decides the whole cache of a shard: its embeddings and its document columns."""
        c = self.cfg
        blob = json.dumps({"embed": self.embed_key(), "tokenizer": c.tokenizer, "source_field": c.source_field,
                           "quality": [c.quality, c.quality_field] + (
                               [c.quality_model, file_id(c.quality_model), c.quality_label]
                               if c.quality == "fasttext" else [])}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def embed_key(self) -> str:
        """What decides the embeddings alone: the encoder settings and the text and id fields. The
        other columns of the cache (source, counts, quality) can be redone without re-embedding."""
        c = self.cfg
        blob = json.dumps({"embedding": self.embedding_settings(), "fields": [c.text_field, c.id_field],
                           "hermes": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def classes_key(self) -> str:
        """What decides the taxonomy stages' labels of a shard: its documents and the models."""
        blob = json.dumps({"cache": self.cache_key(), "fixed": self.fixed.key()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stages_for(cfg: Config, substrate) -> Stages:
    """The stages that label with `substrate`: its embedding settings and its own stage stack."""
    if getattr(substrate, "kind", "") != "embedding":      # a distilled substrate reads text only
        counted_with = cfg.tokenizer or substrate.n_tokens_tokenizer     # count n_tokens as its teacher did
        return Stages(cfg.replace(tokenizer=counted_with) if counted_with else cfg,
                      stack=substrate.stages if substrate.fixed else None)
    return Stages(cfg, embedding=substrate.embedding, stack=substrate.stages, encoder_dir=substrate.encoder_dir)


def reading_fields(cfg: Config) -> Fields:
    return Fields(text=cfg.text_field, id=cfg.id_field, source=cfg.source_field,
                  quality=cfg.quality_field if cfg.quality == "field" else None)


def quality_column(source: str, texts: list[str], field_values: pa.ChunkedArray | pa.Array,
                   scorer=None, words=None) -> pa.Array:
    """The quality score of each document, by the configured source (`words`: the texts split
    already, for the heuristic)."""
    if source == "fasttext":
        return pa.array(scorer.scores(texts), pa.float64())
    if source == "heuristic":
        from hermes.quality import heuristic_scores

        return pa.array(heuristic_scores(texts, words), pa.float64())      # texts: a list or an Arrow column
    if source == "field":
        return field_values
    return pa.nulls(len(texts), pa.float64())


def document_columns(shard: Shard, docs: pa.Table, texts: list[str], stages: Stages, seq: int,
                     n_tokens: np.ndarray | None = None, words=None) -> dict[str, Any]:
    """The per-document columns of one read batch: counts, quality, where it came from, its seq.
    `n_tokens` where the encoder has counted them already (one tokenization), `words` where the
    texts are split into words already (hermes.words.Words)."""
    cfg, n = stages.cfg, len(texts)
    return {"doc_id": docs.column("doc_id"), "source": docs.column("source"),
            "n_chars": pc.utf8_length(docs.column("text")).cast(pa.int32()),
            "n_tokens": pa.array(stages.counter.count(texts) if n_tokens is None else n_tokens, pa.int32()),
            "quality": quality_column(cfg.quality, texts if cfg.quality == "fasttext" else docs.column("text"),
                                      docs.column("quality"), stages.quality_scorer, words),
            "file": pa.array([shard.name] * n, pa.string()), "line": docs.column("line"),
            "seq": pa.array(np.arange(seq, seq + n), pa.int64())}


def label_table(columns: Any, codes: np.ndarray, fingerprint: str) -> pa.Table:
    """A label-file batch: the document columns (anything indexable by name) plus the codes."""
    names = ("doc_id", "source", "n_chars", "n_tokens", "quality")
    return pa.table({**{k: columns[k] for k in names},
                     **{c: pa.array(codes[:, i], pa.int16()) for i, c in enumerate(("c1", "c2", "c3"))},
                     "substrate": pa.array([fingerprint] * len(codes), pa.string()),
                     **{k: columns[k] for k in ("file", "line", "seq")}}, schema=LABEL_FILE_SCHEMA)


def _skipped(step: str, shard: Shard, marker: dict, layout: Layout, progress: Progress | None,
             t0: float) -> "ShardResult":
    """A shard found done: count it in the progress display and the run log, change nothing."""
    result = ShardResult(shard, marker["n_docs"], marker["n_rejects"], skipped=True)
    if progress:
        progress.advance(result.n_docs + result.n_rejects, counted=False)
        progress.shard_done()
    layout.log(step, result, time.perf_counter() - t0)
    return result


def no_token_rejects(shard: Shard, docs: pa.Table, ok: np.ndarray) -> pa.Table:
    """Reject rows for the documents of a read batch that the static encoder has no token for."""
    bad = pa.array(~ok)
    n = int((~ok).sum())
    return pa.table({"file": pa.array([shard.name] * n, pa.string()), "line": docs.column("line").filter(bad),
                     "doc_id": docs.column("doc_id").filter(bad), "reason": pa.array([NO_TOKENS] * n, pa.string())},
                    schema=REJECT_FILE_SCHEMA)


def _reject_table(bad: list) -> pa.Table:
    """Rejected records of a read batch (read.Reject) as rows of a reject file."""
    return pa.Table.from_pylist([r.__dict__ for r in bad], schema=REJECT_FILE_SCHEMA)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class ShardResult:
    shard: Shard
    n_docs: int
    n_rejects: int
    skipped: bool


def embed_shard(shard: Shard, stages: Stages, layout: Layout, progress: Progress | None = None) -> ShardResult:
    """Read, count and embed one shard into the embedding cache; skip it if the cache is current.

    Streams: documents and embeddings are appended batch by batch to files under temporary names,
    so memory is set by the batch sizes, not by the size of the shard."""
    t0 = time.perf_counter()
    key = stages.cache_key()
    marker_path = layout.emb_marker(shard)
    marker = _read_marker(marker_path)
    cached = bool(marker and marker.get("shard") == shard.stat() and layout.docs_file(shard).is_file()
                  and layout.emb_file(shard).is_file())
    if cached and marker.get("cache_key") == key and layout.reject_file(shard).is_file():
        return _skipped("embed", shard, marker, layout, progress, t0)
    if cached and marker.get("embed_key") == stages.embed_key():
        result = _refresh_documents(shard, stages, layout, marker, progress, t0)
        if result is not None:
            return result

    cfg = stages.cfg
    layout.embeddings.mkdir(parents=True, exist_ok=True)
    layout.rejects.mkdir(parents=True, exist_ok=True)
    seq, n_rejects, dim = 0, 0, 0
    with replacing(layout.docs_file(shard), layout.emb_file(shard), layout.reject_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[0], DOCS_SCHEMA) as docs_out, \
            pq.ParquetWriter(tmp[2], REJECT_FILE_SCHEMA) as rejects_out, open(tmp[1], "wb") as emb_out:
        for docs, bad in read_shard(shard, reading_fields(cfg), cfg.read_batch_size):
            if bad:
                rejects_out.write_table(_reject_table(bad))
                n_rejects += len(bad)
                if progress:
                    progress.advance(len(bad))
            n = docs.num_rows
            if not n:
                continue
            texts = docs.column("text").to_pylist()
            n_tokens = None
            if stages.static:         # one tokenization: the vectors, n_tokens, and which texts have a known token
                emb, counted, ok = stages.embedder.encode_counted(texts)
                if not ok.all():
                    rejects_out.write_table(no_token_rejects(shard, docs, ok))
                    n_rejects += int((~ok).sum())
                    docs, texts, emb, counted = docs.filter(pa.array(ok)), [t for t, k in zip(texts, ok) if k], \
                        emb[ok], counted[ok]
                n_tokens = counted if stages.counts_with_encoder else None
                dim = emb.shape[1]
                emb_out.write(np.ascontiguousarray(emb.astype(np.float16)).tobytes())
                if progress:
                    progress.advance(n)
                n = docs.num_rows
            else:
                # encode in slices so progress moves while a large read batch is embedded
                for i in range(0, n, ENCODE_SLICE):
                    emb = stages.embedder.encode(texts[i:i + ENCODE_SLICE]).astype(np.float16)
                    dim = emb.shape[1]
                    emb_out.write(np.ascontiguousarray(emb).tobytes())
                    if progress:
                        progress.advance(min(ENCODE_SLICE, n - i))
            docs_out.write_table(pa.table(document_columns(shard, docs, texts, stages, seq, n_tokens),
                                          schema=DOCS_SCHEMA))
            seq += n
    write_json(marker_path, {"cache_key": key, "embed_key": stages.embed_key(), "shard": shard.stat(), "name": shard.name,
                             "n_docs": seq, "n_rejects": n_rejects, "dim": dim, "dtype": "float16"})
    if progress:
        progress.shard_done()
    result = ShardResult(shard, seq, n_rejects, skipped=False)
    layout.log("embed", result, time.perf_counter() - t0)
    return result


def _refresh_documents(shard: Shard, stages: Stages, layout: Layout, marker: dict, progress: Progress | None,
                       t0: float) -> ShardResult | None:
    """Embeddings cached under other document settings (source field, quality source, tokenizer):
    read the shard again and rewrite only its document columns and rejects, keeping the embeddings,
    if the same documents are accepted in the same order. None if they are not (embed again)."""
    cached_ids = pq.read_table(layout.docs_file(shard), columns=["doc_id"]).column("doc_id")
    seq, n_rejects, same = 0, 0, True
    with replacing(layout.docs_file(shard), layout.reject_file(shard)) as tmp:
        with pq.ParquetWriter(tmp[0], DOCS_SCHEMA) as docs_out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as rej:
            for docs, bad in read_shard(shard, reading_fields(stages.cfg), stages.cfg.read_batch_size):
                if bad:
                    rej.write_table(_reject_table(bad))
                    n_rejects += len(bad)
                n = docs.num_rows
                if seq + n > len(cached_ids) or not docs.column("doc_id").equals(cached_ids.slice(seq, n)):
                    same = False
                    break
                texts = docs.column("text").to_pylist()
                docs_out.write_table(pa.table(document_columns(shard, docs, texts, stages, seq), schema=DOCS_SCHEMA))
                seq += n
        if not same or seq != len(cached_ids):
            tmp.discard()
            return None
    write_json(layout.emb_marker(shard), {**marker, "cache_key": stages.cache_key(), "n_rejects": n_rejects})
    if progress:
        progress.advance(seq + n_rejects, counted=False)
        progress.shard_done()
    result = ShardResult(shard, seq, n_rejects, skipped=True)
    layout.log("embed", result, time.perf_counter() - t0)
    return result


def open_embeddings(emb_file: Path) -> np.ndarray:
    """A cached embedding file as a read-only (n, dim) float16 memory map; shape from its marker."""
    marker = _read_marker(emb_file.with_name(emb_file.name.replace(".emb.f16", ".done.json")))
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


CLASSES_KEY = b"hermes_classes_key"


def _cached_texts(shard: Shard, stages: Stages, n: int, layout: Layout) -> Iterator[list[str]]:
    """The texts of a shard's n cached documents, read again in the same order (cheap next to
    embedding), batch by batch; an error at the end if the file no longer gives those n documents.
    Documents the static encoder rejected (no known token) are not in the cache, so not here."""
    skip = None
    if stages.static and layout.reject_file(shard).is_file():
        rejected = pq.read_table(layout.reject_file(shard), columns=["line", "doc_id", "reason"])
        rejected = rejected.filter(pc.equal(rejected.column("reason"), NO_TOKENS))
        skip = rejected if rejected.num_rows else None
    seen = 0
    for batch, _ in read_shard(shard, reading_fields(stages.cfg), stages.cfg.read_batch_size):
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


def _taxonomy_labels(shard: Shard, stages: Stages, layout: Layout) -> pa.Table:
    """The taxonomy stages' labels of a shard's cached documents (columns stage_<i>), computed from
    the text once and cached beside the embeddings, so changing the stage stack never re-embeds."""
    path = layout.classes_file(shard)
    key = stages.classes_key().encode()
    if path.is_file():
        try:
            if (pq.read_schema(path).metadata or {}).get(CLASSES_KEY) == key:
                return pq.read_table(path)
        except (OSError, pa.ArrowException):
            pass
    columns: dict[str, list[str]] = {f"stage_{i}": [] for i in stages.fixed.taxonomy}
    for texts in _cached_texts(shard, stages, pq.ParquetFile(layout.docs_file(shard)).metadata.num_rows, layout):
        for i, names in stages.fixed.taxonomy_labels(texts).items():
            columns[f"stage_{i}"].extend(names)
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}).replace_schema_metadata({CLASSES_KEY: key})
    write_parquet(path, table)
    return table


def shard_classes(shard: Shard, stages: Stages, layout: Layout) -> dict[int, pa.Array]:
    """Each fixed stage's class name for every cached document of the shard, in cache order."""
    out: dict[int, pa.Array] = {}
    if stages.fixed.taxonomy:
        taxonomy = _taxonomy_labels(shard, stages, layout)
        out.update({i: taxonomy.column(f"stage_{i}").combine_chunks() for i in stages.fixed.taxonomy})
    if len(out) < len(stages.fixed.fixed):
        source = pq.read_table(layout.docs_file(shard), columns=["source"]).column("source").combine_chunks()
        out.update({i: source for i in stages.fixed.fixed if i not in out})
    return out


def class_indices(names: pa.Array, classes: list[str]) -> np.ndarray:
    """Each name's position among `classes`, -1 where it is not one of them."""
    import pyarrow.compute as pc

    idx = pc.index_in(names, value_set=pa.array(classes, pa.string()))
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _stage_classes(shards: list[Shard], counts: list[int], stages: Stages, layout: Layout
                   ) -> tuple[dict[int, list[str]], dict[int, np.ndarray]]:
    """For each fixed stage: its sorted class names (a taxonomy model's labels, or every source in
    the corpus) and each document's class index over the whole corpus (int32, corpus order)."""
    import pyarrow.compute as pc

    from hermes.stages import check_class_count

    live = [s for s, n in zip(shards, counts) if n]
    classes: dict[int, list[str]] = {i: stages.fixed.known_classes(i) for i in stages.fixed.fixed}
    if any(v is None for v in classes.values()):       # sources: every name in the corpus (one pass)
        seen: dict[int, set[str]] = {i: set() for i, v in classes.items() if v is None}
        for shard in live:
            names = shard_classes(shard, stages, layout)
            for i in seen:
                seen[i].update(v for v in pc.unique(names[i]).to_pylist() if v is not None)
                check_class_count(i, stages.stack[i]["kind"], len(seen[i]))     # fail early on an id-like field
        classes.update({i: sorted(v) for i, v in seen.items()})
    for i, known in classes.items():
        check_class_count(i, stages.stack[i]["kind"], len(known))
    codes: dict[int, list[np.ndarray]] = {i: [] for i in classes}      # a second pass: int32 per document
    for shard in live:
        names = shard_classes(shard, stages, layout)
        for i, known in classes.items():
            codes[i].append(class_indices(names[i], known).astype(np.int32))
    return classes, {i: np.concatenate(c) for i, c in codes.items()}


def _top_up(picks: np.ndarray, codes: dict[int, np.ndarray], n_classes: dict[int, int], minimum: int,
            rng: np.random.Generator) -> np.ndarray:
    """The sample plus, for each class of a fixed stage with fewer than `minimum` sampled documents,
    more of its documents (all it has, if fewer), so every class gets a codeword from data."""
    extra = []
    for i, c in codes.items():
        have = np.bincount(c[picks], minlength=n_classes[i])
        short = np.flatnonzero(have < minimum)
        if not len(short):
            continue
        order = np.argsort(c, kind="stable")
        bounds = np.searchsorted(c[order], np.arange(n_classes[i] + 1))
        chosen = np.zeros(len(c), bool)
        chosen[picks] = True
        for k in short:
            members = order[bounds[k]:bounds[k + 1]]
            free = members[~chosen[members]]
            take = min(len(free), minimum - int(have[k]))
            if take > 0:
                extra.append(np.sort(rng.choice(free, take, replace=False)))
    return np.unique(np.concatenate([picks, *extra])) if extra else picks


def fit_substrate(shards: list[Shard], counts: list[int], stages: Stages, layout: Layout,
                  progress_note=None) -> Substrate:
    """Fit transform + RVQ on a seeded uniform sample of the cached embeddings of `shards`
    (topped up so that every class of a fixed stage has data; see _top_up)."""
    from hermes.rvq import ResidualQuantizer, plan_codebook_sizes
    from hermes.transform import IdentityTransform

    cfg = stages.cfg
    total = int(sum(counts))
    if total < 2:
        raise HermesError(f"only {total} document(s) could be read; a substrate needs at least 2",
                          hint="check the input and the rejects reported above")
    n_fit = min(total, cfg.fit_sample)
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(total, n_fit, replace=False)) if n_fit < total else np.arange(total)
    classes, class_codes = _stage_classes(shards, counts, stages, layout) if stages.fixed.fixed else ({}, {})
    for i, c in class_codes.items():
        if (c < 0).any():      # cannot happen for sources; a taxonomy model gives only its labels
            raise HermesError(f"stage {i + 1}: {int((c < 0).sum())} documents have no class")
    if class_codes:
        picks = _top_up(picks, class_codes, {i: len(v) for i, v in classes.items()}, cfg.min_points_per_code, rng)
        n_fit = len(picks)
    parts, offset = [], 0
    for shard, n in zip(shards, counts):
        if n == 0:
            continue
        local = picks[(picks >= offset) & (picks < offset + n)] - offset
        if len(local):
            parts.append(np.asarray(load_cached_embeddings(shard, layout, mmap=True)[local], dtype=np.float32))
        offset += n
    X = np.concatenate(parts)
    fixed = {i: c[picks].astype(np.int64) for i, c in class_codes.items()}
    n_classes = {i: len(v) for i, v in classes.items()}
    sizes, rule = plan_codebook_sizes(total, n_fit, n_classes, N_CODES, cfg.codebook_size, cfg.codebook_sizes,
                                      cfg.min_points_per_code)
    if progress_note:
        progress_note(f"fit: {rule}")
    quantizer = ResidualQuantizer(stages=N_CODES, codebook_size=sizes, min_points_per_code=cfg.min_points_per_code,
                                  iters=cfg.kmeans_iters, seed=cfg.seed, fixed=n_classes)
    training: dict = {"codebook_rule": rule, "corpus_docs": total}
    if cfg.transform == "lst":
        from hermes.lst import LearnedSemanticTransform, LSTSettings

        w = cfg.lst_weights
        lst_settings = LSTSettings(epochs=cfg.lst_epochs, max_steps=cfg.lst_max_steps, batch_size=cfg.lst_batch_size,
                                   lr=float(cfg.lst_lr), w_structure=float(w["structure"]),
                                   w_reconstruction=float(w["reconstruction"]),
                                   w_orthogonality=float(w["orthogonality"]), w_commitment=float(w["commitment"]))
        transform = LearnedSemanticTransform(lst_settings, quantizer, seed=cfg.seed).fit(X, fixed=fixed,
                                                                                         progress=progress_note)
        quantizer = transform.quantizer_
        training.update(history=transform.history_, orthogonality_error=transform.orthogonality_error())
    else:
        transform = IdentityTransform()
        quantizer.fit(transform.transform(X), progress=(lambda s: progress_note(f"fit: RVQ stage {s}/{N_CODES} done"))
                      if progress_note else None, fixed=fixed)
    if fixed:
        training["fit_docs_per_class"] = {str(i + 1): np.bincount(c, minlength=len(classes[i])).tolist()
                                          for i, c in fixed.items()}
    settings = stages.embedding_settings()
    settings["dim"] = int(X.shape[1])
    substrate = Substrate(embedding=settings, transform=transform, quantizer=quantizer, fit_sample_size=n_fit,
                          training=training, stages=substrate_stack(stages, classes),
                          encoder_dir=stages.embedder.folder if stages.static else None)
    substrate.save(layout.substrate)
    return substrate


def substrate_stack(stages: Stages, classes: dict[int, list[str]]) -> list[dict[str, Any]]:
    """The stage stack as a substrate records it: what each fixed stage labels by, and its classes."""
    from hermes.files import sha256

    out = []
    for i, stage in enumerate(stages.stack):
        if stage["kind"] == "source":
            out.append({"kind": "source", "source_field": stages.cfg.source_field, "classes": classes[i]})
        elif stage["kind"] == "fasttext":
            out.append({"kind": "fasttext", "model": stage["model"], "model_sha256": sha256(stage["model"]),
                        "classes": classes[i]})
        else:
            out.append({"kind": stage["kind"]})
    return out


def label_is_current(shard: Shard, substrate: Substrate, stages: Stages, layout: Layout) -> dict | None:
    """The shard's label marker if its labels were made by this substrate from this content, else None."""
    marker = _read_marker(layout.label_marker(shard))
    if marker and marker.get("substrate") == substrate.fingerprint and marker.get("cache_key") == stages.cache_key() \
            and marker.get("shard") == shard.stat() and layout.label_file(shard).is_file() \
            and layout.reject_file(shard).is_file() and layout.terms_file(shard).is_file() \
            and marker.get("path", "embeddings") == label_path(substrate, stages) \
            and (marker.get("path") == "text" or layout.unknown_file(shard).is_file()):
        return marker
    return None


def label_path(substrate, stages: Stages) -> str:
    """How `hermes label` labels a shard: "text", one pass from the text (a distilled substrate, or a
    static encoder when embeddings are not kept), or "embeddings", through the embedding cache."""
    if getattr(substrate, "kind", "embedding") == "distilled" or (stages.static and not stages.cfg.keep_embeddings):
        return "text"
    return "embeddings"


def quantize_shard(shard: Shard, substrate: Substrate, stages: Stages, layout: Layout,
                   progress: Progress | None = None) -> ShardResult:
    """Cached embeddings of one shard -> its label file; skip it if done under this substrate."""
    t0 = time.perf_counter()
    marker = label_is_current(shard, substrate, stages, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, t0)
    emb_marker = _read_marker(layout.emb_marker(shard)) or {}
    docs_file = pq.ParquetFile(layout.docs_file(shard))
    emb = load_cached_embeddings(shard, layout, mmap=True)
    n = docs_file.metadata.num_rows
    if len(emb) != n:
        raise HermesError(f"{layout.emb_file(shard)}: {len(emb)} embeddings for {n} documents",
                          hint=f"delete {layout.embeddings} and rerun")
    if n and emb.shape[1] != substrate.embedding.get("dim", emb.shape[1]):
        raise HermesError(f"{layout.emb_file(shard)}: embedding dimension {emb.shape[1]} does not match the "
                          f"substrate's {substrate.embedding.get('dim')}", hint=f"delete {layout.embeddings} and rerun")
    fixed, known = _fixed_codes(shard, substrate, stages, layout, n)
    codes = np.zeros((n, N_CODES), np.int16)      # 6 bytes a document, kept for the term counts
    start, n_unknown = 0, 0
    # the label file goes last: it is complete only once the others are
    with replacing(layout.terms_file(shard), layout.unknown_file(shard), layout.label_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[2], LABEL_FILE_SCHEMA) as out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as unknown_out:
        for batch in docs_file.iter_batches(batch_size=QUANTIZE_BATCH):
            stop = start + batch.num_rows
            keep = known[start:stop]
            if not keep.all():
                unknown_out.write_table(_unknown_rejects(batch, ~keep, fixed, start, substrate))
                n_unknown += int((~keep).sum())
                batch = batch.filter(pa.array(keep))
            rows = slice(start, stop) if keep.all() else np.flatnonzero(keep) + start
            codes[rows] = substrate.encode(np.asarray(emb[rows], dtype=np.float32),
                                           fixed={i: c[rows] for i, c in fixed.items()})
            out.write_table(label_table({k: batch.column(k) for k in batch.schema.names}, codes[rows],
                                        substrate.fingerprint))
            start = stop
        pq.write_table(_term_counts(shard, stages, codes, known, layout), tmp[0])
    n_rejects = emb_marker.get("n_rejects", 0) + n_unknown
    write_json(layout.label_marker(shard), {"substrate": substrate.fingerprint, "cache_key": emb_marker.get("cache_key"),
                                            "shard": shard.stat(), "name": shard.name, "n_docs": n - n_unknown,
                                            "n_rejects": n_rejects})
    result = ShardResult(shard, n - n_unknown, n_rejects, skipped=False)
    if progress:
        progress.advance(result.n_docs + result.n_rejects)
        progress.shard_done()
    layout.log("label", result, time.perf_counter() - t0)
    return result


def _fixed_codes(shard: Shard, substrate: Substrate, stages: Stages, layout: Layout, n: int
                 ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """The substrate's fixed stages' class index per cached document of the shard, and which
    documents have a class the substrate knows (the others are rejected, not guessed)."""
    if not substrate.fixed or not n:
        return {}, np.ones(n, bool)
    return _class_codes(shard_classes(shard, stages, layout), substrate)


def _class_codes(names: dict[int, pa.Array], substrate) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Each fixed stage's class index per document from its class names, and which documents have
    a class of the substrate in every fixed stage."""
    fixed = {i: class_indices(names[i], substrate.stages[i]["classes"]) for i in substrate.fixed}
    return fixed, np.logical_and.reduce([c >= 0 for c in fixed.values()])


def _unknown_rejects(batch: pa.RecordBatch | pa.Table, bad: np.ndarray, fixed: dict[int, np.ndarray], start: int,
                     substrate: Substrate) -> pa.Table:
    rows = np.flatnonzero(bad)
    reasons = []
    for r in rows:
        i = next(i for i, c in fixed.items() if c[start + r] < 0)
        stage = substrate.stages[i]
        what = f"source (field '{stage['source_field']}')" if stage["kind"] == "source" else "taxonomy label"
        reasons.append(f"{what} is not a class of stage {i + 1} of substrate {substrate.fingerprint} "
                       f"(it has {len(stage['classes'])}); refit with this corpus to include it")
    return pa.table({"file": batch.column("file").take(rows), "line": batch.column("line").take(rows),
                     "doc_id": batch.column("doc_id").take(rows), "reason": pa.array(reasons, pa.string())},
                    schema=REJECT_FILE_SCHEMA)


def _term_counts(shard: Shard, stages: Stages, codes: np.ndarray, keep: np.ndarray, layout: Layout) -> pa.Table:
    """Word counts per L123 cell, streaming: the shard is read again (cheap next to embedding) and
    its i-th accepted document has codes[i] (counted where `keep`)."""
    from hermes.terms import TERM_SCHEMA, TermCounter

    if len(codes) == 0:
        return TERM_SCHEMA.empty_table()
    counter = TermCounter()
    seen = 0
    for texts in _cached_texts(shard, stages, len(codes), layout):
        mask = keep[seen:seen + len(texts)]
        if mask.all():
            counter.add(texts, codes[seen:seen + len(texts)])
        else:
            counter.add([t for t, k in zip(texts, mask) if k], codes[seen:seen + len(texts)][mask])
        seen += len(texts)
    return counter.table()


def label_one_shard(shard: Shard, substrate: Substrate, stages: Stages, layout: Layout,
                    progress: Progress | None = None) -> ShardResult:
    """The per-shard function of `hermes label`, the same on every engine: embed, quantize, drop the
    shard's cached embeddings unless kept (or, with a distilled substrate, codes straight from the
    text). Idempotent: a shard done under this substrate is skipped."""
    if label_path(substrate, stages) == "text":
        return label_shard_from_text(shard, substrate, stages, layout, progress)
    marker = label_is_current(shard, substrate, stages, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, time.perf_counter())
    embedded = embed_shard(shard, stages, layout, progress)
    quantize_shard(shard, substrate, stages, layout)
    if not stages.cfg.keep_embeddings:
        drop_cached_embeddings(shard, layout)
    return embedded


def label_shard_from_text(shard: Shard, substrate, stages: Stages, layout: Layout,
                          progress: Progress | None = None) -> ShardResult:
    """One pass over a shard with a distilled substrate, or a substrate of a static encoder: counts,
    quality and codes from the text, with no embedding cache. A static encoder's vectors are rounded
    to float16 first, as `run` caches them, so both give the same codes."""
    from hermes.terms import TermCounter
    from hermes.words import Words

    t0 = time.perf_counter()
    marker = label_is_current(shard, substrate, stages, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, t0)
    cfg = stages.cfg
    terms = TermCounter()
    seq, n_rejects = 0, 0
    # the label file goes last: it is complete only once the others are
    with replacing(layout.terms_file(shard), layout.reject_file(shard), layout.label_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[2], LABEL_FILE_SCHEMA) as out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as rej, \
            ThreadPoolExecutor(1) as pool:
        batches = read_shard(shard, reading_fields(cfg), cfg.read_batch_size)
        for docs, bad, encoded in (_encoded_ahead(batches, stages.embedder) if stages.static else
                                   ((d, b, None) for d, b in batches)):
            if bad:
                rej.write_table(_reject_table(bad))
                n_rejects += len(bad)
            n = docs.num_rows
            if n and substrate.fixed:          # a fixed stage's class comes from the document
                names = stages.fixed.labels(docs.column("source").to_pylist(), docs.column("text").to_pylist())
                fixed, known = _class_codes({i: pa.array(v, pa.string()) for i, v in names.items()}, substrate)
                if not known.all():
                    where = docs.select(["doc_id", "line"]).append_column("file", pa.array([shard.name] * n, pa.string()))
                    rej.write_table(_unknown_rejects(where, ~known, fixed, 0, substrate))
                    n_rejects += int((~known).sum())
                    docs = docs.filter(pa.array(known))
                    fixed = {i: c[known] for i, c in fixed.items()}
                    if encoded is not None:
                        encoded = ([t for t, k in zip(encoded[0], known) if k], *(x[known] for x in encoded[1:]))
            else:
                fixed = None
            n_tokens = None
            if docs.num_rows and stages.static:
                texts, emb, counted, ok = encoded
                if not ok.all():
                    rej.write_table(no_token_rejects(shard, docs, ok))
                    n_rejects += int((~ok).sum())
                    docs, emb, counted = docs.filter(pa.array(ok)), emb[ok], counted[ok]
                    texts = [t for t, k in zip(texts, ok) if k]
                    fixed = {i: c[ok] for i, c in fixed.items()} if fixed else fixed
                n_tokens = counted if stages.counts_with_encoder else None
                codes = substrate.encode(emb.astype(np.float16).astype(np.float32), fixed=fixed)
            elif docs.num_rows:
                texts = docs.column("text").to_pylist()
                codes = substrate.encode_texts(texts, fixed)
            if docs.num_rows:
                # the words once for both; term counts in a second thread while this one scores
                # quality (Arrow's kernels release the GIL), so the two take the time of one
                words = Words.of(docs.column("text"))
                counting = pool.submit(terms.add, words.texts, codes, words)
                columns = document_columns(shard, docs, texts, stages, seq, n_tokens,
                                           words if cfg.quality == "heuristic" else None)
                counting.result()
                out.write_table(label_table(columns, codes, substrate.fingerprint))
                seq += docs.num_rows
            if progress:
                progress.advance(n + len(bad))
        pq.write_table(terms.table(), tmp[0])
    layout.unknown_file(shard).unlink(missing_ok=True)     # this path writes unknown classes to the rejects
    write_json(layout.label_marker(shard), {"substrate": substrate.fingerprint, "cache_key": stages.cache_key(),
                                            "shard": shard.stat(), "name": shard.name, "n_docs": seq,
                                            "n_rejects": n_rejects, "path": "text"})
    if progress:
        progress.shard_done()
    result = ShardResult(shard, seq, n_rejects, skipped=False)
    layout.log("label", result, time.perf_counter() - t0)
    return result


def _encoded_ahead(batches: Iterator, encoder: StaticEncoder) -> Iterator:
    """(docs, rejects, (texts, vectors, counts, ok)) for each read batch, the next batch's encoding
    running in a second thread while the caller scores, counts and writes this one: the tokenizer
    releases the GIL, and the parts of the work that run on one core leave the other one free."""
    def encode(docs: pa.Table):
        texts = docs.column("text").to_pylist()
        return (texts, *encoder.encode_counted(texts))

    with ThreadPoolExecutor(1) as ahead:
        pending = None
        for docs, bad in batches:
            job = ahead.submit(encode, docs)
            if pending is not None:
                yield pending[0], pending[1], pending[2].result()
            pending = (docs, bad, job)
        if pending is not None:
            yield pending[0], pending[1], pending[2].result()


def drop_cached_embeddings(shard: Shard, layout: Layout) -> None:
    for p in (layout.emb_file(shard), layout.docs_file(shard), layout.emb_marker(shard), layout.classes_file(shard)):
        p.unlink(missing_ok=True)
