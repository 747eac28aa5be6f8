"""The fit between embedding and labeling: a seeded sample of the corpus's embeddings -> transform
+ RVQ -> OUT/substrate/. `run` fits on the embeddings it has cached for labeling
(`fit_substrate`); `fit` reads the corpus once and embeds only its sample (`read_sample`; with a
static encoder, hermes.api drives it). Both draw the same sample of the same corpus (SampleDraw)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hermes.cellkeys import N_CODES
from hermes.classes import corpus_classes
from hermes.errors import HermesError
from hermes.labelers import Batch, ClassNames, class_name_column
from hermes.layout import Layout, load_cached_embeddings, read_marker
from hermes.models import Models, reading_fields
from hermes.read import Shard, read_shard
from hermes.stack import check_class_count
from hermes.substrate import Substrate
from hermes.vectors import rank_within


class SampleDraw:
    """The fit sample, drawn in one pass over the corpus. Every document read gets a key from one
    seeded stream of uniform numbers, in corpus order; the sample is the `n` documents with the
    smallest keys (a uniform sample without replacement), plus, for each class of a fixed stage that
    has fewer than `minimum` documents in it, the class's next documents by key (all it has, if
    fewer), so every class gets a codeword from data. Documents the encoder refuses take their key
    and no part: `run` offers only those it embedded, and `fit`, which reads before its static
    encoder exists, keeps `margin` more candidates (and up to `minimum` more per class) and drops
    the refused ones from them (`result`). Only candidates are kept, with an optional payload row
    each (the text, say): at most about 1.25 times the sample and margin, plus each class's first
    `minimum` (and margin) documents, which the top-up may need, whatever the corpus's size. `run`
    (from its embedding cache) and `fit` (while reading) draw the same documents.

    Written here because the sample must be drawn while reading, with the class top-up, and equal
    whatever the batches; numpy's and scikit-learn's samplers need the corpus's size first."""

    def __init__(self, n: int, seed: int, minimum: int = 0, margin: int = 0):
        self.n, self.minimum, self.margin = n, minimum, margin
        self._rng = np.random.default_rng(seed)
        self.seen = 0
        self._sample = _Candidates(n + margin)                  # the n (+ margin) smallest keys
        self._classes: dict[int, _Candidates] = {}              # per stage: each class's smallest

    def add(self, count: int, labels: dict[int, np.ndarray] | None = None, payload: pa.Table | None = None,
            offered: np.ndarray | None = None) -> None:
        """The next `count` documents read, in corpus order; of these, only those where `offered`
        (a bool mask, default all) is True take part, and `labels` (each fixed stage's class label
        of each, small integers >= 0; their names are the caller's) and `payload` (a row each) are
        of those alone."""
        keys, positions = self._rng.random(count), np.arange(self.seen, self.seen + count)
        self.seen += count
        if offered is not None:
            keys, positions = keys[offered], positions[offered]
        rows = {"key": keys, "position": positions,
                **{f"label_{i}": np.asarray(v, dtype=np.int64) for i, v in (labels or {}).items()}, "payload": payload}
        self._sample.offer(rows)
        if self.minimum:
            for i in labels or {}:
                # a class keeps at most `minimum` more: many classes must not hold many candidates each
                self._classes.setdefault(i, _Candidates(self.minimum + min(self.margin, self.minimum),
                                                        f"label_{i}")).offer(rows)

    def candidates(self) -> tuple[np.ndarray, pa.Table | None]:
        """(the positions of every document the sample may still take, in corpus order, and their
        payload rows): what `result(refused=...)` needs checked."""
        rows = _each_position_once([pool.kept() for pool, _ in self._pools()])
        return (rows["position"], rows["payload"]) if rows else (np.zeros(0, dtype=np.int64), None)

    def result(self, refused: np.ndarray | None = None
               ) -> tuple[np.ndarray, dict[int, np.ndarray], pa.Table | None, bool]:
        """(the sample's positions in corpus order, each stage's labels of them, their payload rows
        in that order, whether it is exact). `refused`: positions among `candidates()` that take no
        part. The sample is exact unless more candidates were refused than the margin kept (of the
        sample, or of a class with more documents than its candidates): the caller must then draw
        again, offering only the documents it accepts."""
        refused = np.zeros(0, dtype=np.int64) if refused is None else np.asarray(refused, dtype=np.int64)
        exact = True
        picked = []
        for pool, k in self._pools():
            kept = pool.kept()
            if kept is None:
                continue
            label = kept[pool.per] if pool.per else np.zeros(len(kept["key"]), dtype=np.int64)
            accepted = ~np.isin(kept["position"], refused)
            left = np.bincount(label[accepted], minlength=len(pool.lost))
            # a label whose kept rows are all it was offered is exact with any refusals
            exact &= bool(np.all((left >= k) | ~pool.lost))
            kept = _take(kept, accepted)
            picked.append(_take(kept, rank_within(label[accepted]) < k))     # kept: by key within each label
        rows = _each_position_once(picked)
        if rows is None:
            return np.zeros(0, dtype=np.int64), {}, None, exact
        return rows["position"], {int(k[6:]): v for k, v in rows.items() if k.startswith("label_")}, \
            rows["payload"], exact

    def _pools(self) -> list[tuple["_Candidates", int]]:
        return [(self._sample, self.n)] + [(p, self.minimum) for p in self._classes.values()]


def _each_position_once(parts: list[dict | None]) -> dict | None:
    """The rows of `parts` (dicts of columns), each position once, in corpus order."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    rows = _joined(parts)
    _, first = np.unique(rows["position"], return_index=True)
    return _take(rows, first)


class _Candidates:
    """The rows with the `k` smallest keys (per label of column `per`, if given), kept from rows
    offered in any batches; rows above the current k-th key are dropped as they come."""

    SLACK = 4096        # rows held past k (per label) before the smallest are picked again

    def __init__(self, k: int, per: str | None = None):
        self.k, self.per = k, per
        self._parts: list[dict] = []
        self._held = 0
        self._bound = np.full(1, np.inf)        # the k-th smallest key so far, per label (one entry if no `per`)
        self.lost = np.zeros(1, dtype=bool)     # per label: a row was dropped (so the rows kept are not all)

    def offer(self, rows: dict) -> None:
        label = rows[self.per] if self.per else np.zeros(len(rows["key"]), dtype=np.int64)
        if len(label) and label.max() >= len(self._bound):
            grow = label.max() + 1 - len(self._bound)
            self._bound = np.concatenate([self._bound, np.full(grow, np.inf)])
            self.lost = np.concatenate([self.lost, np.zeros(grow, dtype=bool)])
        mask = rows["key"] < self._bound[label]
        self.lost[label[~mask]] = True
        if not mask.any():
            return
        self._parts.append(_take(rows, mask))
        self._held += int(mask.sum())
        room = self.k * len(self._bound)
        if self._held > room + max(room // 4, self.SLACK):
            self._compact()

    def _compact(self) -> None:
        rows = _joined(self._parts)
        order = np.lexsort((rows["position"], rows["key"]))       # by key, ties by position
        label = rows[self.per][order] if self.per else np.zeros(len(order), dtype=np.int64)
        rank = rank_within(label)                                 # each row's rank by key within its label
        keep = order[rank < self.k]
        self.lost[label[rank >= self.k]] = True
        kept = _take(rows, keep)
        self._parts, self._held = [kept], len(keep)
        kept_label = label[rank < self.k]
        full = np.bincount(kept_label, minlength=len(self._bound)) >= self.k
        last = np.full(len(self._bound), -np.inf)
        np.maximum.at(last, kept_label, rows["key"][keep])
        self._bound = np.where(full, last, np.inf)           # a label with k rows takes only smaller keys now

    def kept(self) -> dict | None:
        """The rows kept, by key (ties by position), at most k per label."""
        if not self._parts:
            return None
        self._compact()
        return self._parts[0]


def _joined(parts: list[dict]) -> dict:
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "payload"}
    payloads = [p["payload"] for p in parts]
    out["payload"] = pa.concat_tables(payloads) if payloads[0] is not None else None
    return out


def _take(rows: dict, which: np.ndarray) -> dict:
    which = np.flatnonzero(which) if which.dtype == bool else which
    return {k: None if v is None else v.take(pa.array(which, pa.int64())) if k == "payload" else v[which]
            for k, v in rows.items()}


def check_enough(total: int, which: str = "could be read") -> None:
    if total < 2:
        raise HermesError(f"only {total} document(s) {which}; a substrate needs at least 2",
                          hint="check the input and the rejects reported above")


DRAW_CHUNK = 1 << 20        # documents per SampleDraw.add when the whole corpus is at hand


def refusal_margin(fit_sample: int) -> int:
    """How many more candidates than the sample needs `fit` keeps while reading, for the documents
    a static encoder built after the reading pass may refuse (binary, or no known token: rare)."""
    return max(64, -(-fit_sample // 100))


def fit_substrate(shards: list[Shard], counts: list[int], models: Models, layout: Layout,
                  progress_note=None) -> Substrate:
    """Fit transform + RVQ on the fit sample (SampleDraw) of the cached embeddings of `shards`
    (`counts`: the documents each cached). The documents are offered at their positions among
    those read, as `fit` offers them while reading: a document the encoder refused takes its key
    and no part, so both draw the same sample."""
    cfg = models.cfg
    check_enough(int(sum(counts)))
    classes, class_codes = corpus_classes(shards, counts, models, layout) if models.fixed.indices else ({}, {})
    for i, c in class_codes.items():
        if (c < 0).any():      # cannot happen for sources; a taxonomy model gives only its labels
            raise HermesError(f"stage {i + 1}: {int((c < 0).sum())} documents have no class")
    draw = SampleDraw(cfg.fit_sample, cfg.seed, cfg.min_points_per_code if class_codes else 0)
    cached_at, cached = [], 0             # per shard: its first read position, documents read, first cache row
    for shard, n in zip(shards, counts):
        read = cached_read_positions(shard, layout) if n else np.zeros(0, dtype=np.int64)
        n_read = int(read_marker(layout.emb_marker(shard))["n_read"])
        offered = np.zeros(n_read, dtype=bool)
        offered[read] = True
        for start in range(0, n_read, DRAW_CHUNK):
            part = offered[start:start + DRAW_CHUNK]
            lo, hi = cached + np.searchsorted(read, [start, start + len(part)])
            draw.add(len(part), {i: c[lo:hi] for i, c in class_codes.items()}, offered=part)
        cached_at.append((draw.seen - n_read, n_read, cached))
        cached += n
    picks = draw.result()[0]
    parts, rows = [], []
    for shard, (first, n_read, offset) in zip(shards, cached_at):
        local = picks[(picks >= first) & (picks < first + n_read)] - first
        if len(local):      # rows in the cache (the read positions read again: memory follows the sample)
            at = np.searchsorted(cached_read_positions(shard, layout), local)
            parts.append(np.asarray(load_cached_embeddings(shard, layout, mmap=True)[at], dtype=np.float32))
            rows.append(offset + at)
    rows = np.concatenate(rows)
    return fit_on(np.concatenate(parts), {i: c[rows] for i, c in class_codes.items()}, classes, draw.seen,
                  models, layout, progress_note)


def cached_read_positions(shard: Shard, layout: Layout) -> np.ndarray:
    """The read positions (column `read`) of a shard's cached documents, in cache order (rising)."""
    import pyarrow.parquet as pq

    return pq.read_table(layout.docs_file(shard), columns=["read"]).column("read").to_numpy().astype(np.int64)


@dataclass
class ReadSample:
    """What one reading pass gives `fit`: the fit sample's texts and classes, and the corpus's counts."""
    positions: np.ndarray             # the sample's documents, positions in corpus order
    texts: pa.Array                   # their texts, in that order
    codes: dict[int, np.ndarray]      # each fixed stage's class index of each
    classes: dict[int, list[str]]     # each fixed stage's class names (sorted, or the taxonomy's)
    counts: list[int]                 # documents read in each shard
    rejected: int                     # records rejected while reading
    exact: bool = True                # False: more candidates were refused than the margin kept (draw again)
    vectors: np.ndarray | None = None  # the sample's vectors, if `refusals` gave them


def read_sample(shards: list[Shard], models: Models, margin: int = 0, also=None, refusals=None) -> ReadSample:
    """The corpus read once: each shard's documents counted, each one's fixed-stage classes named,
    and the fit sample drawn (SampleDraw, as `run` draws it from its cache) with its texts kept.
    `also(texts)` is called with every read batch's texts too (a static encoder's own sample).
    `refusals(texts)`, called once the corpus is read with the texts of every candidate (`margin`
    more than the sample needs), gives (vectors, ok): the documents not ok take no part, as the
    encoder refuses them in `run`, and the sample's vectors come with it."""
    cfg, fixed = models.cfg, models.fixed
    minimum = cfg.min_points_per_code if fixed.indices else 0
    draw = SampleDraw(cfg.fit_sample, cfg.seed, minimum, margin=margin)
    classes: dict[int, list[str] | None] = {i: fixed.known_classes(i) for i in fixed.indices}
    ids: dict[int, dict[str, int]] = {i: {} for i in fixed.indices}    # class name -> label, in order seen
    docs_per_label = {i: np.zeros(0, dtype=np.int64) for i in fixed.indices}   # to count those of a class it lacks
    labeler = ClassNames(fixed).setup() if fixed.indices else None
    counts, rejected = [], 0
    for shard in shards:
        n = 0
        for docs, bad in read_shard(shard, reading_fields(cfg), cfg.read_batch_size):
            n, rejected = n + docs.num_rows, rejected + len(bad)
            if also is not None:
                also(docs.column("text"))
            labels = {}
            if labeler is not None and docs.num_rows:
                named = labeler(Batch(docs, shard.name))
                for i in fixed.indices:
                    names = named.column(class_name_column(i)).to_pylist()
                    seen = ids[i]
                    for name in set(names) - seen.keys():
                        seen[name] = len(seen)
                    check_class_count(i, models.stack[i]["kind"], len(seen))    # fail early on an id-like field
                    labels[i] = np.fromiter(map(seen.__getitem__, names), dtype=np.int64, count=len(names))
                    per_label = np.bincount(labels[i], minlength=len(seen))
                    grown = np.zeros(len(seen) - len(docs_per_label[i]), np.int64)
                    docs_per_label[i] = np.concatenate([docs_per_label[i], grown])
                    docs_per_label[i] += per_label
            # large_string: the sample's texts may pass 2 GiB together (32-bit offsets would overflow)
            draw.add(docs.num_rows, labels, pa.table({"text": docs.column("text").cast(pa.large_string())}))
        counts.append(n)
    check_enough(int(sum(counts)))
    refused, vectors, present = None, None, {i: np.ones(len(ids[i]), dtype=bool) for i in fixed.indices}
    if refusals is not None:
        candidates, payload = draw.candidates()
        got, ok = refusals(payload.column("text").combine_chunks()) if len(candidates) else (None, np.zeros(0, bool))
        refused = candidates[~ok]
    positions, labels, payload, exact = draw.result(refused)      # fewer documents than fit_sample: all of them
    if refusals is not None and len(positions):
        vectors = got[np.searchsorted(candidates, positions)]
        # a class none of whose documents the encoder takes is not one (run sees none of it): once
        # the sample is exact, every class with an accepted document has one among the candidates
        for i in fixed.indices:
            present[i] = np.bincount(labels[i], minlength=len(ids[i])) > 0
    codes = {}
    for i in fixed.indices:
        in_order = [name for name, label in ids[i].items() if present[i][label]]       # label order
        names = sorted(in_order) if classes[i] is None else classes[i]
        check_class_count(i, models.stack[i]["kind"], len(names))
        code_of = {name: k for k, name in enumerate(names)}
        by_label = np.array([code_of.get(name, -1) for name in ids[i]], dtype=np.int64)   # ids[i]: in label order
        missing = (by_label < 0) & present[i]
        if missing.any():        # as run checks: any document of the corpus, sampled or not
            raise HermesError(f"stage {i + 1}: {int(docs_per_label[i][missing].sum())} documents have no class")
        codes[i] = by_label[labels[i]] if len(by_label) else np.zeros(0, dtype=np.int64)
        classes[i] = names
    texts = payload.column("text").combine_chunks() if payload is not None else pa.array([], pa.large_string())
    return ReadSample(positions, texts, codes, classes, counts, rejected, exact, vectors)


def fit_sample_only(shards: list[Shard], models: Models, layout: Layout, progress_note=None
                    ) -> tuple[Substrate, list[int], int]:
    """`hermes fit` with the transformer: the corpus is read once, to count its documents, give
    each its fixed-stage classes and draw the fit sample as `run` draws it (keeping the sample's
    texts); only the sample is embedded: a fit costs its sample and one read of the corpus.
    Returns (the substrate, each shard's documents, the records rejected while reading)."""
    say = progress_note or (lambda m: None)
    sample = read_sample(shards, models)
    total = int(sum(sample.counts))
    say(f"fit: embedding the sample only: {len(sample.positions):,} of {total:,} documents")
    X = embed_texts(sample.texts, models, say)
    return (fit_on(X, sample.codes, sample.classes, total, models, layout, progress_note), sample.counts,
            sample.rejected)


def embed_texts(texts: pa.Array, models: Models, say=lambda m: None) -> np.ndarray:
    """The embeddings of `texts`, rounded to float16 as the embedding cache holds them, a read
    batch at a time."""
    embedder, size = models.embedder.setup(), models.cfg.read_batch_size
    parts = []
    for start in range(0, len(texts), size):
        parts.append(embedder.encode(texts.slice(start, size).to_pylist()).astype(np.float16))
        say(f"fit: embedded {min(start + size, len(texts)):,} of {len(texts):,}")
    return np.concatenate(parts).astype(np.float32)


def fit_on(X: np.ndarray, fixed: dict[int, np.ndarray], classes: dict[int, list[str]], total: int, models: Models,
           layout: Layout, progress_note=None) -> Substrate:
    """Transform + RVQ fitted on the sample's embeddings X (float16 values as the cache holds
    them; `fixed`: each fixed stage's class index of each sample document), saved to OUT/substrate."""
    from hermes.rvq import ResidualQuantizer, plan_codebook_sizes
    from hermes.transform import IdentityTransform

    cfg = models.cfg
    n_fit = len(X)
    fixed = {i: np.asarray(c, dtype=np.int64) for i, c in fixed.items()}
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
    settings = models.embedding_settings()
    settings["dim"] = int(X.shape[1])
    substrate = Substrate(embedding=settings, transform=transform, quantizer=quantizer, fit_sample_size=n_fit,
                          training=training, stages=substrate_stack(models, classes),
                          encoder_dir=models.embedder.folder if models.static else None)
    substrate.save(layout.substrate)
    return substrate


def substrate_stack(models: Models, classes: dict[int, list[str]]) -> list[dict[str, Any]]:
    """The stage stack as a substrate records it: what each fixed stage labels by, and its classes."""
    from hermes.files import sha256

    out = []
    for i, stage in enumerate(models.stack):
        if stage["kind"] == "source":
            out.append({"kind": "source", "source_field": models.cfg.source_field, "classes": classes[i]})
        elif stage["kind"] == "fasttext":
            out.append({"kind": "fasttext", "model": stage["model"], "model_sha256": sha256(stage["model"]),
                        "classes": classes[i]})
        else:
            out.append({"kind": stage["kind"]})
    return out
