"""Labelers: the steps that label a batch of documents, under one contract.

A labeler takes a `Batch` (an Arrow table of documents, rows in read order) and returns the same
rows in the same order with its columns added. It loads its models in `setup()` (on first use),
and `key()` names every setting that changes its output: the embedding cache's key and the label
markers are made of its labelers' keys (hermes.models). A document a labeler cannot label gets a
reason in the REJECT column instead; `apply` moves such rows to the rejects before the next
labeler sees the batch, so no labeler ever gets a row another one refused.

    StaticTokens        text -> n_tokens, and the token ids for StaticVectors; rejects: no known token
    StaticVectors       the token ids -> embedding (in the labeling thread, while the tokens of the
                        next batch are made in the other)
    TransformerVectors  text -> embedding
    CachedVectors       row (a position in a shard's embedding cache) -> embedding
    Counts              text -> n_chars, n_tokens (unless the encoder counted them)
    Quality             text, or the quality field -> quality
    ClassNames          source, text -> class_name_<i> for each fixed stage i
    Classes             class_name_<i> -> class_<i> under a substrate; rejects: a class it lacks
    Codes               embedding, class_<i> -> c1, c2, c3
    DistilledCodes      text, class_<i> -> c1, c2, c3

The per-shard functions (hermes.pipeline) are one loop, `label_batches`, over the list of labelers
each needs, with the output files as sinks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hermes.cellkeys import CODES, N_CODES
from hermes.static import NO_TOKENS
from hermes.store import REJECT_FILE_SCHEMA
from hermes.words import Words

REJECT = "reject"        # a labeler's reason for refusing a row (null where the row is labeled)
EMBEDDING = "embedding"  # a document's vector, a fixed-size list column


class Batch:
    """A batch of documents on its way through the labelers: an Arrow table whose rows stay in read
    order, and views of it the labelers share, made once (the texts as str, their words, their
    token ids)."""

    def __init__(self, table: pa.Table, file: str, texts: list[str] | None = None):
        self.table, self.file = table, file      # file: the shard's name, as reject rows give it
        self._texts, self._words = texts, None
        self.tokens = None                       # hermes.static.Tokens, from StaticTokens

    def _with_table(self, table: pa.Table, keep: np.ndarray | None = None) -> "Batch":
        """A batch of `table` with this one's views: of the rows where `keep` is True, if given."""
        if keep is None:
            out = Batch(table, self.file, self._texts)
            out._words, out.tokens = self._words, self.tokens
            return out
        out = Batch(table, self.file, [t for t, k in zip(self._texts, keep) if k] if self._texts is not None else None)
        out._words = self._words.take(keep) if self._words is not None else None
        out.tokens = self.tokens.take(keep) if self.tokens is not None else None
        return out

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = self.column("text").to_pylist()
        return self._texts

    @property
    def words(self) -> Words:
        """The texts split into words once (the quality heuristic and the term counts share it), from
        the static encoder's split into pieces where it made one."""
        if self._words is None:
            self._words = Words.of_split(self.column("text"), self.tokens.pieces if self.tokens is not None else None)
        return self._words

    def vectors(self) -> np.ndarray:
        """The embedding column as an (n, dim) array."""
        col = self.column(EMBEDDING).combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)

    def with_columns(self, **columns: Any) -> "Batch":
        """The same rows with these columns added (or replaced); numpy (n, d) arrays become
        fixed-size list columns."""
        table = self.table
        for name, values in columns.items():
            if isinstance(values, np.ndarray) and values.ndim == 2:
                values = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
        return self._with_table(table)

    def refuse(self, bad: np.ndarray, reasons: str | list[str]) -> "Batch":
        """The same rows, the `bad` ones with a reason (one for all, or one per bad row)."""
        if not bad.any():
            return self
        n = len(self)
        if isinstance(reasons, str):
            reasons = [reasons] * int(bad.sum())
        values = np.full(n, None, dtype=object)
        values[np.flatnonzero(bad)] = reasons
        new = pa.array(values, pa.string())
        if self.has(REJECT):          # a row refused already keeps its first reason
            new = pc.coalesce(self.column(REJECT), new)
        return self.with_columns(**{REJECT: new})

    def split(self) -> tuple["Batch", pa.Table]:
        """(the rows no labeler refused, the refused ones as reject-file rows)."""
        if not self.has(REJECT):
            return self, REJECT_FILE_SCHEMA.empty_table()
        reason = self.column(REJECT)
        bad = pc.is_valid(reason).to_numpy(zero_copy_only=False)
        rejects = pa.table({"file": pa.array([self.file] * int(bad.sum()), pa.string()),
                            "line": self.column("line").filter(pa.array(bad)),
                            "doc_id": self.column("doc_id").filter(pa.array(bad)),
                            "reason": reason.filter(pa.array(bad))}, schema=REJECT_FILE_SCHEMA)
        table = self.table.drop_columns([REJECT])
        if not bad.any():
            return self._with_table(table), rejects
        return self._with_table(table.filter(pa.array(~bad)), ~bad), rejects


class Labeler:
    """Adds columns to a batch of documents: the same rows, in the same order."""

    adds: tuple[str, ...] = ()

    def setup(self) -> "Labeler":
        """Load the models (once); calling it again costs nothing."""
        return self

    def key(self) -> dict[str, Any]:
        """The settings that change this labeler's output (JSON-serialisable)."""
        return {}

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError


class StaticTokens(Labeler):
    """A static encoder's token ids of each text (`batch.tokens`, for StaticVectors); with `counts`,
    n_tokens from the same ids (one tokenization). A text with no token the encoder knows is
    refused: it would get no vector."""

    adds = ("n_tokens",)

    def __init__(self, encoder, counts: bool):
        self.encoder, self.counts = encoder, counts

    def setup(self) -> "StaticTokens":
        self.encoder.setup()
        return self

    def key(self) -> dict[str, Any]:
        return self.encoder.settings()

    def __call__(self, batch: Batch) -> Batch:
        tokens = self.encoder.tokenize(batch.column("text"))
        out = batch.with_columns(**({"n_tokens": pa.array(tokens.counts, pa.int32())} if self.counts else {}))
        out.tokens = tokens               # its split into pieces serves the words view too
        return out.refuse(tokens.known == 0, NO_TOKENS)


class StaticVectors(Labeler):
    """A static encoder's vectors, from the token ids StaticTokens found (a text whose known tokens'
    vectors sum to zero is refused too)."""

    adds = (EMBEDDING,)

    def __init__(self, encoder):
        self.encoder = encoder

    def key(self) -> dict[str, Any]:
        return self.encoder.settings()

    def __call__(self, batch: Batch) -> Batch:
        vectors, ok = self.encoder.vectors(batch.tokens)
        return batch.with_columns(**{EMBEDDING: vectors}).refuse(~ok, NO_TOKENS)


class TransformerVectors(Labeler):
    """The transformer's embeddings, in slices of `slice_size` texts; `on_slice(n)` after each (a
    progress line moves while a large batch is embedded)."""

    adds = (EMBEDDING,)

    def __init__(self, embedder, settings: dict[str, Any], slice_size: int = 512,
                 on_slice: Callable[[int], None] | None = None):
        self.embedder, self.settings, self.slice_size, self.on_slice = embedder, settings, slice_size, on_slice

    def setup(self) -> "TransformerVectors":
        self.embedder.setup()
        return self

    def key(self) -> dict[str, Any]:
        return self.settings

    def __call__(self, batch: Batch) -> Batch:
        texts, parts = batch.texts, []
        for i in range(0, len(texts), self.slice_size):
            parts.append(self.embedder.encode(texts[i:i + self.slice_size]).astype(np.float32))
            if self.on_slice:
                self.on_slice(len(parts[-1]))
        return batch.with_columns(**{EMBEDDING: np.concatenate(parts) if parts else self.embedder.encode([])})


class CachedVectors(Labeler):
    """The vectors of a shard's embedding cache (float16, one row per cached document), by each
    document's position in the cache (the `row` column): the embedding labeler of `run`'s second
    half, once the first half has embedded and cached the shard. Its key is the cache's own
    (hermes.models.Models.cache_key, in the shard's markers)."""

    adds = (EMBEDDING,)

    def __init__(self, cached: np.ndarray):
        self.cached = cached           # (n, dim), a memory map of the cache file

    def __call__(self, batch: Batch) -> Batch:
        rows = batch.column("row").to_numpy()
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:       # consecutive: one slice of the file
            return batch.with_columns(**{EMBEDDING: np.asarray(self.cached[rows[0]:rows[-1] + 1])})
        return batch.with_columns(**{EMBEDDING: np.asarray(self.cached[rows])})


class Counts(Labeler):
    """n_chars, and n_tokens by `counter` (a loaded TokenCounter or static encoder, `.count(texts)`),
    unless an earlier labeler counted them already."""

    adds = ("n_chars", "n_tokens")

    def __init__(self, counter: Callable[[], Any], tokenizer: str | None):
        self._counter, self.tokenizer = counter, tokenizer      # counter: loads it on first use

    def key(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer}

    def __call__(self, batch: Batch) -> Batch:
        columns = {"n_chars": pc.utf8_length(batch.column("text")).cast(pa.int32())}
        if not batch.has("n_tokens"):
            columns["n_tokens"] = pa.array(self._counter().count(batch.texts), pa.int32())
        return batch.with_columns(**columns)


class Quality(Labeler):
    """The quality score: the heuristic, a fastText classifier's probability, a record field's
    value (the read batch's `quality` column), or null."""

    adds = ("quality",)

    def __init__(self, source: str, field: str | None, model: str | None = None, label: str | None = None,
                 model_id: Any = None, scorer: Callable[[], Any] | None = None):
        self.source, self.field, self.model, self.label, self.model_id = source, field, model, label, model_id
        self._scorer = scorer          # loads the fastText scorer on first use
        self._sums = None              # the heuristic's word counts per piece of text, kept across batches

    def key(self) -> dict[str, Any]:
        return {"quality": [self.source, self.field] + (
            [self.model, self.model_id, self.label] if self.source == "fasttext" else [])}

    def __call__(self, batch: Batch) -> Batch:
        if self.source == "fasttext":
            scores = pa.array(self._scorer().scores(batch.texts), pa.float64())
        elif self.source == "heuristic":
            from hermes.quality import heuristic_scores, word_counts
            from hermes.words import PieceSums

            self._sums = self._sums or PieceSums(word_counts, 6)
            scores = pa.array(heuristic_scores(batch.words.texts, batch.words, self._sums), pa.float64())
        elif self.source == "field":
            scores = batch.column("quality")
        else:
            scores = pa.nulls(len(batch), pa.float64())
        return batch.with_columns(quality=scores)


def class_name_column(i: int) -> str:
    return f"class_name_{i}"


def class_column(i: int) -> str:
    return f"class_{i}"


class ClassNames(Labeler):
    """Each fixed stage's class name: the document's source, or a fastText taxonomy's label of its
    text (`fixed`: hermes.stack.FixedLabelers)."""

    def __init__(self, fixed):
        self.fixed = fixed
        self.adds = tuple(class_name_column(i) for i in fixed.indices)

    def setup(self) -> "ClassNames":
        self.fixed.setup()
        return self

    def key(self) -> dict[str, Any]:
        return {"fixed": self.fixed.key()}

    def __call__(self, batch: Batch) -> Batch:
        if not len(batch):
            return batch.with_columns(**{c: pa.array([], pa.string()) for c in self.adds})
        names = self.fixed.labels(batch.column("source").to_pylist(), batch.texts)
        return batch.with_columns(**{class_name_column(i): pa.array(v, pa.string()) for i, v in names.items()})


def class_indices(names: pa.Array | pa.ChunkedArray, classes: list[str]) -> np.ndarray:
    """Each name's position among `classes`, -1 where it is not one of them."""
    idx = pc.index_in(names, value_set=pa.array(classes, pa.string()))
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


class Classes(Labeler):
    """Each fixed stage's class index under a substrate, from the class names; a document whose
    class the substrate does not know is refused, not guessed."""

    def __init__(self, substrate):
        self.substrate = substrate
        self.adds = tuple(class_column(i) for i in substrate.fixed)

    def key(self) -> dict[str, Any]:
        return {"substrate": self.substrate.fingerprint}

    def __call__(self, batch: Batch) -> Batch:
        sub = self.substrate
        codes = {i: class_indices(batch.column(class_name_column(i)), sub.stages[i]["classes"]) for i in sub.fixed}
        out = batch.with_columns(**{class_column(i): pa.array(c, pa.int64()) for i, c in codes.items()})
        unknown = {i: c < 0 for i, c in codes.items()}
        bad = np.logical_or.reduce(list(unknown.values())) if unknown else np.zeros(len(batch), bool)
        if not bad.any():
            return out
        reasons = []
        for r in np.flatnonzero(bad):
            i = next(i for i, u in unknown.items() if u[r])
            stage = sub.stages[i]
            what = f"source (field '{stage['source_field']}')" if stage["kind"] == "source" else "taxonomy label"
            reasons.append(f"{what} is not a class of stage {i + 1} of substrate {sub.fingerprint} "
                           f"(it has {len(stage['classes'])}); refit with this corpus to include it")
        return out.refuse(bad, reasons)


def fixed_of(batch: Batch, substrate) -> dict[int, np.ndarray] | None:
    """The batch's class index per fixed stage of the substrate (None if it has none)."""
    if not substrate.fixed:
        return None
    return {i: batch.column(class_column(i)).to_numpy() for i in substrate.fixed}


class Codes(Labeler):
    """The substrate's codes of the embeddings. The vectors are rounded to float16 first, as the
    embedding cache holds them, so labeling straight from the text and from the cache agree."""

    adds = CODES

    def __init__(self, substrate):
        self.substrate = substrate

    def key(self) -> dict[str, Any]:
        return {"substrate": self.substrate.fingerprint}

    def __call__(self, batch: Batch) -> Batch:
        emb = batch.vectors().astype(np.float16).astype(np.float32)
        return batch.with_columns(**codes_columns(self.substrate.encode(emb, fixed=fixed_of(batch, self.substrate))))


class DistilledCodes(Labeler):
    """A distilled substrate's codes, straight from the text."""

    adds = CODES

    def __init__(self, substrate):
        self.substrate = substrate

    def setup(self) -> "DistilledCodes":
        self.substrate.setup()
        return self

    def key(self) -> dict[str, Any]:
        return {"substrate": self.substrate.fingerprint}

    def __call__(self, batch: Batch) -> Batch:
        codes = self.substrate.encode_texts(batch.texts, fixed_of(batch, self.substrate)) if len(batch) else \
            np.zeros((0, N_CODES), np.int16)
        return batch.with_columns(**codes_columns(codes))


def codes_columns(codes: np.ndarray) -> dict[str, pa.Array]:
    return {c: pa.array(np.asarray(codes[:, i], dtype=np.int16), pa.int16()) for i, c in enumerate(CODES)}


def codes_of(batch: Batch) -> np.ndarray:
    """The batch's codes as an (n, 3) int16 array."""
    return np.stack([batch.column(c).to_numpy() for c in CODES], axis=1) if len(batch) else \
        np.zeros((0, N_CODES), np.int16)


def apply(batch: Batch, labelers: Iterable[Labeler]) -> tuple[Batch, list[pa.Table]]:
    """The labelers in order over one batch; each one's refused rows leave before the next."""
    rejected = []
    for labeler in labelers:
        batch, refused = labeler(batch).split()
        if refused.num_rows:
            rejected.append(refused)
    return batch, rejected


def _arrow_pool_that_keeps_memory() -> None:
    """Arrow's jemalloc pool instead of its default mimalloc one, where the build has both. Each
    batch allocates and frees arrays of megabytes; mimalloc hands freed pages back to the kernel
    within milliseconds, and the next batch's arrays come back as fresh pages the kernel zeroes
    (a tenth of `hermes label`'s CPU time went to clearing pages, by `perf`). With jemalloc, static
    labeling of the dev corpus took 7% less time and CPU; on a million documents, where most pieces
    are known, it made no difference (docs/benchmarks.md). glibc's and numpy's settings for the
    same (mallopt thresholds, no huge pages) changed nothing measurable. The pool is the process's:
    it stays for every later labeling (any encoder) and Arrow allocation."""
    if pa.default_memory_pool().backend_name == "mimalloc":
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:        # a build without jemalloc keeps its pool
            pass


def give_back_memory() -> None:
    """Return what labeling freed to the system before the store is built, so that DuckDB's memory
    comes on top of less: Arrow's unused pool pages, and glibc's free heap pages (`malloc_trim`;
    numpy's and the tokenizer's freed arrays stay in glibc's heaps otherwise, over a hundred MB
    after a long run). Elsewhere than glibc, only Arrow's."""
    import ctypes
    import gc

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# The first read batch is labeled in pieces of these sizes first: the second thread's first batch
# (the encoder's piece table empty, every piece new) is then short, and this thread starts on its
# part after a quarter of a second instead of a second (dev corpus; docs/benchmarks.md).
RAMP = (256, 768)


def _ramped(batches: Iterable[tuple[pa.Table, pa.Table]], sizes: tuple[int, ...]) -> Iterator[tuple[pa.Table, pa.Table]]:
    """The batches, the first one cut into pieces of `sizes` documents first (its read rejects go
    with the first piece)."""
    it = iter(batches)
    for docs, read_rejects in it:
        start = 0
        for size in sizes:
            if docs.num_rows - start <= size:
                break
            yield docs.slice(start, size), read_rejects
            read_rejects, start = REJECT_FILE_SCHEMA.empty_table(), start + size
        yield docs.slice(start), read_rejects
        break
    yield from it


def label_batches(batches: Iterable[tuple[pa.Table, pa.Table]], file: str, labelers: list[Labeler],
                  ahead: int = 0) -> Iterator[tuple[Batch, pa.Table, int]]:
    """The one loop of every per-shard function: (labeled batch, its rejects, rows read) for each
    (documents, rejects found while reading) pair. The first `ahead` labelers run one batch ahead
    in a second thread (the tokenizer and Arrow release the GIL), while this thread runs the rest
    and the caller writes; the first read batch then goes in smaller pieces (RAMP)."""
    _arrow_pool_that_keeps_memory()
    for labeler in labelers:
        labeler.setup()
    first, rest = labelers[:ahead], labelers[ahead:]

    def finish(batch: Batch, early: list[pa.Table], read_rejects: pa.Table, n: int):
        batch, late = apply(batch, rest)
        rejects = [t for t in (read_rejects, *early, *late) if t.num_rows]
        return batch, pa.concat_tables(rejects) if rejects else REJECT_FILE_SCHEMA.empty_table(), n

    if not first:
        for docs, read_rejects in batches:
            yield finish(Batch(docs, file), [], read_rejects, docs.num_rows + read_rejects.num_rows)
        return
    import os

    from threadpoolctl import threadpool_limits

    # the two labeling threads keep two cores busy: BLAS gets the others (on 2 cores, a second
    # BLAS thread would only spin against them)
    with ThreadPoolExecutor(1) as pool, threadpool_limits(max(1, (os.cpu_count() or 2) - 2), user_api="blas"):
        pending = None
        for docs, read_rejects in _ramped(batches, RAMP):
            job = pool.submit(apply, Batch(docs, file), first)
            if pending is not None:
                yield finish(*pending[0].result(), *pending[1:])
            pending = (job, read_rejects, docs.num_rows + read_rejects.num_rows)
        if pending is not None:
            yield finish(*pending[0].result(), *pending[1:])
