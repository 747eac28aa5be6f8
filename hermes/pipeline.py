"""The per-shard work of `run` and `label`, the same on every engine (hermes.engines). Each
per-shard function is one loop (`labelers.label_batches`) over the labelers it needs, with its
output files as sinks:

    embed_shard:      read -> [vectors, counts, quality] -> embeddings/<shard>.{docs.parquet,emb.f16}
                                                           + rejects/<shard>.parquet
    (hermes.fit:      a seeded sample of the cached embeddings -> transform + RVQ -> substrate/)
    quantize_shard:   the cache -> [classes, codes] -> labels/<shard>.parquet + terms/<shard>.parquet
    label_shard_from_text: with a distilled substrate or a static encoder, read ->
                      [class names, classes, vectors, codes (or distilled codes), counts, quality]
                      in one pass over the text, with no embedding cache

Each per-shard function is idempotent: it writes under a temporary name, renames when the shard
is complete, and records a marker naming the settings it ran with (its labelers' keys,
hermes.models), so a rerun skips what is done and redoes what changed. Embeddings are cached as
float16 and the codes are always computed from float16 values, so labeling straight after
embedding and labeling from the cache agree.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hermes.cellkeys import N_CODES
from hermes.classes import shard_classes
from hermes.errors import HermesError
from hermes.files import replacing, write_json
from hermes.labelers import (EMBEDDING, Batch, CachedVectors, Classes, Codes, DistilledCodes, Labeler,
                             class_name_column, codes_of, label_batches)
from hermes.layout import (DOCS_SCHEMA, Layout, ShardResult, cached_texts, drop_cached_embeddings,
                           load_cached_embeddings, read_marker)
from hermes.models import Models, reading_fields
from hermes.progress import Progress
from hermes.read import Shard, read_shard
from hermes.store import LABEL_FILE_SCHEMA, REJECT_FILE_SCHEMA
from hermes.substrate import Substrate

QUANTIZE_BATCH = 16384   # documents per quantizer call from the embedding cache


def read_batches(shard: Shard, cfg, numbered: list[int] | None = None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(documents, rejects found while reading) for each read batch of a shard. With `numbered` (a
    one-item list, the count so far), each document gets its position among the documents read
    (column `read`), and the count goes on."""
    for docs, bad in read_shard(shard, reading_fields(cfg), cfg.read_batch_size):
        if numbered is not None:
            docs = docs.append_column("read", pa.array(np.arange(numbered[0], numbered[0] + docs.num_rows), pa.int64()))
            numbered[0] += docs.num_rows
        yield docs, (pa.Table.from_pylist([r.__dict__ for r in bad], schema=REJECT_FILE_SCHEMA) if bad
                     else REJECT_FILE_SCHEMA.empty_table())


def rows_of(batch: Batch, schema: pa.Schema, seq: int = 0, **constants: str) -> pa.Table:
    """A labeled batch as rows of an output file: its columns named in `schema`, the `constants`
    given, and, where the batch has none yet, where each document came from (the shard, and its
    position in the shard's accepted documents from `seq` on)."""
    n = len(batch)
    made = {"file": lambda: pa.array([batch.file] * n, pa.string()),
            "seq": lambda: pa.array(np.arange(seq, seq + n), pa.int64())}

    def column(name: str):
        if name in constants:
            return pa.array([constants[name]] * n, pa.string())
        return batch.column(name) if batch.has(name) else made[name]()

    return pa.table({name: column(name) for name in schema.names}, schema=schema)


def _skipped(step: str, shard: Shard, marker: dict, layout: Layout, progress: Progress | None,
             t0: float) -> "ShardResult":
    """A shard found done: count it in the progress display and the run log, change nothing."""
    result = ShardResult(shard, marker["n_docs"], marker["n_rejects"], skipped=True)
    if progress:
        progress.advance(result.n_docs + result.n_rejects, counted=False)
        progress.shard_done()
    layout.log(step, result, time.perf_counter() - t0)
    return result


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

    layout.embeddings.mkdir(parents=True, exist_ok=True)
    layout.rejects.mkdir(parents=True, exist_ok=True)
    embedding = models.embedding(on_slice=progress.advance if progress else None)
    ticks = not models.static         # the transformer moves the progress line itself, slice by slice
    seq, n_rejects, dim, read = 0, 0, 0, [0]
    with replacing(layout.docs_file(shard), layout.emb_file(shard), layout.reject_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[0], DOCS_SCHEMA) as docs_out, \
            pq.ParquetWriter(tmp[2], REJECT_FILE_SCHEMA) as rejects_out, open(tmp[1], "wb") as emb_out:
        for batch, rejects, n_read in label_batches(read_batches(shard, models.cfg, numbered=read), shard.name,
                                                    [*embedding, models.counts(), models.quality()],
                                                    ahead=0 if ticks else 1):
            if rejects.num_rows:
                rejects_out.write_table(rejects)
                n_rejects += rejects.num_rows
            vectors = batch.vectors() if batch.has(EMBEDDING) else None   # (0, dim) if every one was refused
            if vectors is not None:
                dim = vectors.shape[1]
            if len(batch):
                emb_out.write(np.ascontiguousarray(vectors.astype(np.float16)).tobytes())
                docs_out.write_table(rows_of(batch, DOCS_SCHEMA, seq))
                seq += len(batch)
            if progress:
                progress.advance(rejects.num_rows if ticks else n_read)
    write_json(marker_path, {"cache_key": key, "embed_key": models.embed_key(), "shard": shard.stat(), "name": shard.name,
                             "n_docs": seq, "n_rejects": n_rejects, "n_read": read[0], "dim": dim, "dtype": "float16"})
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
            for batch, rejects, _ in label_batches(read_batches(shard, models.cfg, numbered=[0]), shard.name,
                                                   [models.counts(), models.quality()]):
                if rejects.num_rows:
                    rej.write_table(rejects)
                    n_rejects += rejects.num_rows
                n = len(batch)
                if seq + n > len(cached_ids) or not batch.column("doc_id").equals(cached_ids.slice(seq, n)):
                    same = False
                    break
                docs_out.write_table(rows_of(batch, DOCS_SCHEMA, seq))
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
    names = shard_classes(shard, models, layout) if substrate.fixed and n else {}

    def cached_batches() -> Iterator[tuple[pa.Table, pa.Table]]:
        """The cached documents with their class names and position in the cache."""
        start = 0
        for part in docs_file.iter_batches(batch_size=QUANTIZE_BATCH):
            stop = start + part.num_rows
            batch = Batch(pa.Table.from_batches([part]), shard.name).with_columns(
                row=pa.array(np.arange(start, stop), pa.int64()),
                **{class_name_column(i): names[i].slice(start, stop - start) for i in names})
            yield batch.table, REJECT_FILE_SCHEMA.empty_table()
            start = stop

    codes = np.zeros((n, N_CODES), np.int16)      # 6 bytes a document, kept for the term counts
    known = np.zeros(n, bool)
    labelers = [CachedVectors(emb)] + ([Classes(substrate)] if substrate.fixed else []) + [Codes(substrate)]
    n_unknown = 0
    # the label file goes last: it is complete only once the others are
    with replacing(layout.terms_file(shard), layout.unknown_file(shard), layout.label_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[2], LABEL_FILE_SCHEMA) as out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as unknown_out:
        for batch, unknown, _ in label_batches(cached_batches(), shard.name, labelers):
            if unknown.num_rows:
                unknown_out.write_table(unknown)
                n_unknown += unknown.num_rows
            rows = batch.column("row").to_numpy()
            codes[rows], known[rows] = codes_of(batch), True
            out.write_table(rows_of(batch, LABEL_FILE_SCHEMA, substrate=substrate.fingerprint))
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
    """One pass over a shard with a distilled substrate, or a substrate of a static encoder: classes,
    codes, counts and quality from the text, with no embedding cache (a static encoder's vectors are
    rounded to float16 first, as `run` caches them, so both give the same codes)."""
    from hermes.terms import TermCounter

    t0 = time.perf_counter()
    marker = label_is_current(shard, substrate, models, layout)
    if marker:
        return _skipped("label", shard, marker, layout, progress, t0)
    labelers: list[Labeler] = [models.class_names(), Classes(substrate)] if substrate.fixed else []
    if models.static:       # classes and tokens of the next batch in a second thread
        labelers += [*models.embedding(), Codes(substrate)]
        ahead = len(labelers) - 2
    else:
        labelers += [DistilledCodes(substrate)]
        ahead = 0
    labelers += [models.counts(), models.quality()]
    terms = TermCounter()
    seq, n_rejects, counting = 0, 0, None
    # the label file goes last: it is complete only once the others are
    with replacing(layout.terms_file(shard), layout.reject_file(shard), layout.label_file(shard)) as tmp, \
            pq.ParquetWriter(tmp[2], LABEL_FILE_SCHEMA) as out, pq.ParquetWriter(tmp[1], REJECT_FILE_SCHEMA) as rej, \
            ThreadPoolExecutor(1) as pool:
        for batch, rejects, n_read in label_batches(read_batches(shard, models.cfg), shard.name, labelers, ahead):
            if rejects.num_rows:
                rej.write_table(rejects)
                n_rejects += rejects.num_rows
            if len(batch):
                # term counts in a third thread, while this one labels the next batch (Arrow's
                # kernels release the GIL); one worker, so the counts are added in order
                if counting is not None:
                    counting.result()
                counting = pool.submit(_count_terms, terms, batch)
                out.write_table(rows_of(batch, LABEL_FILE_SCHEMA, seq, substrate=substrate.fingerprint))
                seq += len(batch)
            if progress:
                progress.advance(n_read)
        if counting is not None:
            counting.result()
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


def _count_terms(terms, batch: Batch) -> None:
    words = batch.words            # split once already if the quality heuristic ran
    terms.add(words.texts, codes_of(batch), words)
