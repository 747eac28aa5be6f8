"""The fit between embedding and labeling: a seeded sample of the corpus's embeddings -> transform
+ RVQ -> OUT/substrate/. `run` fits on the embeddings it has cached for labeling
(`fit_substrate`); `fit` with the transformer embeds only its sample (`fit_sample_only`). Both
draw the same sample of the same corpus."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from hermes.cellkeys import N_CODES
from hermes.classes import corpus_classes
from hermes.errors import HermesError
from hermes.labelers import Batch, ClassNames, class_name_column
from hermes.layout import Layout, load_cached_embeddings
from hermes.models import Models, reading_fields
from hermes.read import Shard, read_shard
from hermes.substrate import Substrate


def top_up(picks: np.ndarray, codes: dict[int, np.ndarray], n_classes: dict[int, int], minimum: int,
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


def check_enough(total: int) -> None:
    if total < 2:
        raise HermesError(f"only {total} document(s) could be read; a substrate needs at least 2",
                          hint="check the input and the rejects reported above")


def sample_positions(total: int, cfg, class_codes: dict[int, np.ndarray], classes: dict[int, list[str]]
                     ) -> np.ndarray:
    """The fit sample: a seeded uniform sample of `fit_sample` of the corpus's `total` documents
    (positions in corpus order), topped up so that every class of a fixed stage has data."""
    check_enough(total)
    n_fit = min(total, cfg.fit_sample)
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(total, n_fit, replace=False)) if n_fit < total else np.arange(total)
    for i, c in class_codes.items():
        if (c < 0).any():      # cannot happen for sources; a taxonomy model gives only its labels
            raise HermesError(f"stage {i + 1}: {int((c < 0).sum())} documents have no class")
    if class_codes:
        picks = top_up(picks, class_codes, {i: len(v) for i, v in classes.items()}, cfg.min_points_per_code, rng)
    return picks


def fit_substrate(shards: list[Shard], counts: list[int], models: Models, layout: Layout,
                  progress_note=None) -> Substrate:
    """Fit transform + RVQ on a seeded uniform sample of the cached embeddings of `shards`
    (topped up so that every class of a fixed stage has data; see top_up)."""
    total = int(sum(counts))
    check_enough(total)
    classes, class_codes = corpus_classes(shards, counts, models, layout) if models.fixed.indices else ({}, {})
    picks = sample_positions(total, models.cfg, class_codes, classes)
    parts, offset = [], 0
    for shard, n in zip(shards, counts):
        if n == 0:
            continue
        local = picks[(picks >= offset) & (picks < offset + n)] - offset
        if len(local):
            parts.append(np.asarray(load_cached_embeddings(shard, layout, mmap=True)[local], dtype=np.float32))
        offset += n
    return fit_on(np.concatenate(parts), picks, class_codes, classes, total, models, layout, progress_note)


def fit_sample_only(shards: list[Shard], models: Models, layout: Layout, progress_note=None
                    ) -> tuple[Substrate, list[int], int]:
    """`hermes fit` with the transformer: the corpus is read to count its documents (and, with
    fixed stages, to give each one its class), the fit sample is drawn as `fit_substrate` draws
    it, and only the sample is embedded: a fit costs its sample, not the corpus. Returns (the
    substrate, each shard's documents, the records rejected while reading)."""
    cfg = models.cfg
    say = progress_note or (lambda m: None)

    def batches(shard: Shard):
        return read_shard(shard, reading_fields(cfg), cfg.read_batch_size)

    counts, rejected = [], 0
    for shard in shards:
        n = 0
        for docs, bad in batches(shard):
            n, rejected = n + docs.num_rows, rejected + len(bad)
        counts.append(n)
    total = int(sum(counts))
    check_enough(total)
    classes, class_codes = ({}, {})
    if models.fixed.indices:
        labeler = ClassNames(models.fixed).setup()

        def names_of(shard: Shard) -> dict[int, pa.Array]:
            parts: dict[int, list] = {i: [] for i in models.fixed.indices}
            for docs, _ in batches(shard):
                named = labeler(Batch(docs, shard.name))
                for i in parts:
                    parts[i].extend(named.column(class_name_column(i)).chunks)
            return {i: pa.concat_arrays(v) if v else pa.array([], pa.string()) for i, v in parts.items()}

        classes, class_codes = corpus_classes(shards, counts, models, layout, names_of)
    picks = sample_positions(total, cfg, class_codes, classes)
    say(f"fit: embedding the sample only: {len(picks):,} of {total:,} documents")
    X = embed_positions(shards, counts, picks, models, say)
    return fit_on(X, picks, class_codes, classes, total, models, layout, progress_note), counts, rejected


def embed_positions(shards: list[Shard], counts: list[int], picks: np.ndarray, models: Models,
                    say=lambda m: None) -> np.ndarray:
    """The embeddings of the corpus's documents at `picks` (positions among the documents read,
    in corpus order), rounded to float16 as the embedding cache holds them; one reading pass over
    the shards that hold any of them."""
    cfg = models.cfg
    embedder = models.embedder.setup()
    parts, offset, done = [], 0, 0
    for shard, n in zip(shards, counts):
        local = picks[(picks >= offset) & (picks < offset + n)] - offset
        start = 0
        for docs, _ in (read_shard(shard, reading_fields(cfg), cfg.read_batch_size) if len(local) else ()):
            m = docs.num_rows
            take = local[(local >= start) & (local < start + m)] - start
            if len(take):
                texts = docs.column("text").take(pa.array(take)).to_pylist()
                parts.append(embedder.encode(texts).astype(np.float16))
                done += len(take)
                say(f"fit: embedded {done:,} of {len(picks):,}")
            start += m
        offset += n
    return np.concatenate(parts).astype(np.float32)


def fit_on(X: np.ndarray, picks: np.ndarray, class_codes: dict[int, np.ndarray], classes: dict[int, list[str]],
           total: int, models: Models, layout: Layout, progress_note=None) -> Substrate:
    """Transform + RVQ fitted on the sample's embeddings X (the documents at `picks`, float16
    values as the cache holds them), saved to OUT/substrate."""
    from hermes.rvq import ResidualQuantizer, plan_codebook_sizes
    from hermes.transform import IdentityTransform

    cfg = models.cfg
    n_fit = len(picks)
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
