"""The per-shard work of `run` and `label`, the same on every engine (hermes.engines).

    embed_shard:      read -> n_chars, n_tokens, quality -> embed -> embeddings/<shard>.{docs.parquet,emb.f16}
                                                                    + rejects/<shard>.parquet
    (hermes.fit:      a seeded sample of the cached embeddings -> transform + RVQ -> substrate/)
    quantize_shard:   cached embeddings -> codes -> labels/<shard>.parquet + terms/<shard>.parquet
    label_shard_from_text: with a distilled substrate or a static encoder, all of it in one pass
                      over the text, with no embedding cache

Each per-shard function is idempotent: it writes under a temporary name, renames when the shard
is complete, and records a marker naming the settings it ran with, so a rerun skips what is done
and redoes what changed. Embeddings are cached as float16 and the codes are always computed from
those float16 values, so labeling straight after embedding and labeling from the cache agree.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hermes.cellkeys import N_CODES
from hermes.classes import class_codes, fixed_codes
from hermes.errors import HermesError
from hermes.files import replacing, write_json
from hermes.layout import (DOCS_SCHEMA, Layout, ShardResult, cached_texts, drop_cached_embeddings,
                           load_cached_embeddings, read_marker)
from hermes.models import Models, reading_fields
from hermes.progress import Progress
from hermes.read import Shard, read_shard
from hermes.static import NO_TOKENS, StaticEncoder
from hermes.store import LABEL_FILE_SCHEMA, REJECT_FILE_SCHEMA
from hermes.substrate import Substrate

QUANTIZE_BATCH = 16384   # documents per quantizer call from the embedding cache


ENCODE_SLICE = 512   # documents per encoder call from embed_shard (the encoder sorts each by length)


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


def document_columns(shard: Shard, docs: pa.Table, texts: list[str], models: Models, seq: int,
                     n_tokens: np.ndarray | None = None, words=None) -> dict[str, Any]:
    """The per-document columns of one read batch: counts, quality, where it came from, its seq.
    `n_tokens` where the encoder has counted them already (one tokenization), `words` where the
    texts are split into words already (hermes.words.Words)."""
    cfg, n = models.cfg, len(texts)
    return {"doc_id": docs.column("doc_id"), "source": docs.column("source"),
            "n_chars": pc.utf8_length(docs.column("text")).cast(pa.int32()),
            "n_tokens": pa.array(models.counter.count(texts) if n_tokens is None else n_tokens, pa.int32()),
            "quality": quality_column(cfg.quality, texts if cfg.quality == "fasttext" else docs.column("text"),
                                      docs.column("quality"), models.quality_scorer, words),
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


def embed_shard(shard: Shard, models: Models, layout: Layout, progress: Progress | None = None) -> ShardResult:
    """Read, count and embed one shard into the embedding cache; skip it if the cache is current.

    Streams: documents and embeddings are appended batch by batch to files under temporary names,
    so memory is set by the batch sizes, not by the size of the shard."""
    t0 = time.perf_counter()
    key = models.cache_key()
    marker_path = layout.emb_marker(shard)
    marker = read_marker(marker_path)
    cached = bool(marker and marker.get("shard") == shard.stat() and layout.docs_file(shard).is_file()
                  and layout.emb_file(shard).is_file())
    if cached and marker.get("cache_key") == key and layout.reject_file(shard).is_file():
        return _skipped("embed", shard, marker, layout, progress, t0)
    if cached and marker.get("embed_key") == models.embed_key():
        result = _refresh_documents(shard, models, layout, marker, progress, t0)
        if result is not None:
            return result

    cfg = models.cfg
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
            if models.static:         # one tokenization: the vectors, n_tokens, and which texts have a known token
                emb, counted, ok = models.embedder.encode_counted(texts)
                if not ok.all():
                    rejects_out.write_table(no_token_rejects(shard, docs, ok))
                    n_rejects += int((~ok).sum())
                    docs, texts, emb, counted = docs.filter(pa.array(ok)), [t for t, k in zip(texts, ok) if k], \
                        emb[ok], counted[ok]
                n_tokens = counted if models.counts_with_encoder else None
                dim = emb.shape[1]
                emb_out.write(np.ascontiguousarray(emb.astype(np.float16)).tobytes())
                if progress:
                    progress.advance(n)
                n = docs.num_rows
            else:
                # encode in slices so progress moves while a large read batch is embedded
                for i in range(0, n, ENCODE_SLICE):
                    emb = models.embedder.encode(texts[i:i + ENCODE_SLICE]).astype(np.float16)
                    dim = emb.shape[1]
                    emb_out.write(np.ascontiguousarray(emb).tobytes())
                    if progress:
                        progress.advance(min(ENCODE_SLICE, n - i))
            docs_out.write_table(pa.table(document_columns(shard, docs, texts, models, seq, n_tokens),
                                          schema=DOCS_SCHEMA))
            seq += n
    write_json(marker_path, {"cache_key": key, "embed_key": models.embed_key(), "shard": shard.stat(), "name": shard.name,
                             "n_docs": seq, "n_rejects": n_rejects, "dim": dim, "dtype": "float16"})
    if progress:
        progress.shard_done()
    result = ShardResult(shard, seq, n_rejects, skipped=False)
    layout.log("embed", result, time.perf_counter() - t0)
    return result


def _refresh_documents(shard: Shard, models: Models, layout: Layout, marker: dict, progress: Progress | None,
                       t0: float) -> ShardResult | None:
    """Embeddings cached under other document settings (source field, quality source, tokenizer):
    read the shard again and rewrite only its document columns and rejects, keeping the embeddings,
    if the same documents are accepted in the same order. None if they are not (embed again)."""
    cached_ids = pq.read_table(layout.docs_file(shard), columns=["doc_id"]).column("doc_id")
    seq, n_rejects, same = 0, 0, True
    with replacing(layout.docs_file(shard), layout.reject_file(shard)) as tmp:
        with pq.ParquetWriter(tmp[0], DOCS_SCHEMA) as docs_out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as rej:
            for docs, bad in read_shard(shard, reading_fields(models.cfg), models.cfg.read_batch_size):
                if bad:
                    rej.write_table(_reject_table(bad))
                    n_rejects += len(bad)
                n = docs.num_rows
                if seq + n > len(cached_ids) or not docs.column("doc_id").equals(cached_ids.slice(seq, n)):
                    same = False
                    break
                texts = docs.column("text").to_pylist()
                docs_out.write_table(pa.table(document_columns(shard, docs, texts, models, seq), schema=DOCS_SCHEMA))
                seq += n
        if not same or seq != len(cached_ids):
            tmp.discard()
            return None
    write_json(layout.emb_marker(shard), {**marker, "cache_key": models.cache_key(), "n_rejects": n_rejects})
    if progress:
        progress.advance(seq + n_rejects, counted=False)
        progress.shard_done()
    result = ShardResult(shard, seq, n_rejects, skipped=True)
    layout.log("embed", result, time.perf_counter() - t0)
    return result


def label_is_current(shard: Shard, substrate: Substrate, models: Models, layout: Layout) -> dict | None:
    """The shard's label marker if its labels were made by this substrate from this content, else None."""
    marker = read_marker(layout.label_marker(shard))
    if marker and marker.get("substrate") == substrate.fingerprint and marker.get("cache_key") == models.cache_key() \
            and marker.get("shard") == shard.stat() and layout.label_file(shard).is_file() \
            and layout.reject_file(shard).is_file() and layout.terms_file(shard).is_file() \
            and marker.get("path", "embeddings") == label_path(substrate, models) \
            and (marker.get("path") == "text" or layout.unknown_file(shard).is_file()):
        return marker
    return None


def label_path(substrate, models: Models) -> str:
    """How `hermes label` labels a shard: "text", one pass from the text (a distilled substrate, or a
    static encoder when embeddings are not kept), or "embeddings", through the embedding cache."""
    if getattr(substrate, "kind", "embedding") == "distilled" or (models.static and not models.cfg.keep_embeddings):
        return "text"
    return "embeddings"


def quantize_shard(shard: Shard, substrate: Substrate, models: Models, layout: Layout,
                   progress: Progress | None = None) -> ShardResult:
    """Cached embeddings of one shard -> its label file; skip it if done under this substrate."""
    t0 = time.perf_counter()
    marker = label_is_current(shard, substrate, models, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, t0)
    emb_marker = read_marker(layout.emb_marker(shard)) or {}
    docs_file = pq.ParquetFile(layout.docs_file(shard))
    emb = load_cached_embeddings(shard, layout, mmap=True)
    n = docs_file.metadata.num_rows
    if len(emb) != n:
        raise HermesError(f"{layout.emb_file(shard)}: {len(emb)} embeddings for {n} documents",
                          hint=f"delete {layout.embeddings} and rerun")
    if n and emb.shape[1] != substrate.embedding.get("dim", emb.shape[1]):
        raise HermesError(f"{layout.emb_file(shard)}: embedding dimension {emb.shape[1]} does not match the "
                          f"substrate's {substrate.embedding.get('dim')}", hint=f"delete {layout.embeddings} and rerun")
    fixed, known = fixed_codes(shard, substrate, models, layout, n)
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
        pq.write_table(_term_counts(shard, models, codes, known, layout), tmp[0])
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


def _term_counts(shard: Shard, models: Models, codes: np.ndarray, keep: np.ndarray, layout: Layout) -> pa.Table:
    """Word counts per L123 cell, streaming: the shard is read again (cheap next to embedding) and
    its i-th accepted document has codes[i] (counted where `keep`)."""
    from hermes.terms import TERM_SCHEMA, TermCounter

    if len(codes) == 0:
        return TERM_SCHEMA.empty_table()
    counter = TermCounter()
    seen = 0
    for texts in cached_texts(shard, models, len(codes), layout):
        mask = keep[seen:seen + len(texts)]
        if mask.all():
            counter.add(texts, codes[seen:seen + len(texts)])
        else:
            counter.add([t for t, k in zip(texts, mask) if k], codes[seen:seen + len(texts)][mask])
        seen += len(texts)
    return counter.table()


def label_one_shard(shard: Shard, substrate: Substrate, models: Models, layout: Layout,
                    progress: Progress | None = None) -> ShardResult:
    """The per-shard function of `hermes label`, the same on every engine: embed, quantize, drop the
    shard's cached embeddings unless kept (or, with a distilled substrate, codes straight from the
    text). Idempotent: a shard done under this substrate is skipped."""
    if label_path(substrate, models) == "text":
        return label_shard_from_text(shard, substrate, models, layout, progress)
    marker = label_is_current(shard, substrate, models, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, time.perf_counter())
    embedded = embed_shard(shard, models, layout, progress)
    quantize_shard(shard, substrate, models, layout)
    if not models.cfg.keep_embeddings:
        drop_cached_embeddings(shard, layout)
    return embedded


def label_shard_from_text(shard: Shard, substrate, models: Models, layout: Layout,
                          progress: Progress | None = None) -> ShardResult:
    """One pass over a shard with a distilled substrate, or a substrate of a static encoder: counts,
    quality and codes from the text, with no embedding cache. A static encoder's vectors are rounded
    to float16 first, as `run` caches them, so both give the same codes."""
    from hermes.terms import TermCounter
    from hermes.words import Words

    t0 = time.perf_counter()
    marker = label_is_current(shard, substrate, models, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, t0)
    cfg = models.cfg
    terms = TermCounter()
    seq, n_rejects = 0, 0
    # the label file goes last: it is complete only once the others are
    with replacing(layout.terms_file(shard), layout.reject_file(shard), layout.label_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[2], LABEL_FILE_SCHEMA) as out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as rej, \
            ThreadPoolExecutor(1) as pool:
        batches = read_shard(shard, reading_fields(cfg), cfg.read_batch_size)
        for docs, bad, encoded in (_encoded_ahead(batches, models.embedder) if models.static else
                                   ((d, b, None) for d, b in batches)):
            if bad:
                rej.write_table(_reject_table(bad))
                n_rejects += len(bad)
            n = docs.num_rows
            if n and substrate.fixed:          # a fixed stage's class comes from the document
                names = models.fixed.labels(docs.column("source").to_pylist(), docs.column("text").to_pylist())
                fixed, known = class_codes({i: pa.array(v, pa.string()) for i, v in names.items()}, substrate)
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
            if docs.num_rows and models.static:
                texts, emb, counted, ok = encoded
                if not ok.all():
                    rej.write_table(no_token_rejects(shard, docs, ok))
                    n_rejects += int((~ok).sum())
                    docs, emb, counted = docs.filter(pa.array(ok)), emb[ok], counted[ok]
                    texts = [t for t, k in zip(texts, ok) if k]
                    fixed = {i: c[ok] for i, c in fixed.items()} if fixed else fixed
                n_tokens = counted if models.counts_with_encoder else None
                codes = substrate.encode(emb.astype(np.float16).astype(np.float32), fixed=fixed)
            elif docs.num_rows:
                texts = docs.column("text").to_pylist()
                codes = substrate.encode_texts(texts, fixed)
            if docs.num_rows:
                # the words once for both; term counts in a second thread while this one scores
                # quality (Arrow's kernels release the GIL), so the two take the time of one
                words = Words.of(docs.column("text"))
                counting = pool.submit(terms.add, words.texts, codes, words)
                columns = document_columns(shard, docs, texts, models, seq, n_tokens,
                                           words if cfg.quality == "heuristic" else None)
                counting.result()
                out.write_table(label_table(columns, codes, substrate.fingerprint))
                seq += docs.num_rows
            if progress:
                progress.advance(n + len(bad))
        pq.write_table(terms.table(), tmp[0])
    layout.unknown_file(shard).unlink(missing_ok=True)     # this path writes unknown classes to the rejects
    write_json(layout.label_marker(shard), {"substrate": substrate.fingerprint, "cache_key": models.cache_key(),
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
