"""The fit between embedding and labeling: a seeded sample of the cached embeddings -> transform
+ RVQ -> OUT/substrate/."""

from __future__ import annotations

from typing import Any

import numpy as np

from hermes.cellkeys import N_CODES
from hermes.classes import corpus_classes
from hermes.errors import HermesError
from hermes.layout import Layout, load_cached_embeddings
from hermes.models import Models
from hermes.read import Shard
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


def fit_substrate(shards: list[Shard], counts: list[int], models: Models, layout: Layout,
                  progress_note=None) -> Substrate:
    """Fit transform + RVQ on a seeded uniform sample of the cached embeddings of `shards`
    (topped up so that every class of a fixed stage has data; see top_up)."""
    from hermes.rvq import ResidualQuantizer, plan_codebook_sizes
    from hermes.transform import IdentityTransform

    cfg = models.cfg
    total = int(sum(counts))
    if total < 2:
        raise HermesError(f"only {total} document(s) could be read; a substrate needs at least 2",
                          hint="check the input and the rejects reported above")
    n_fit = min(total, cfg.fit_sample)
    rng = np.random.default_rng(cfg.seed)
    picks = np.sort(rng.choice(total, n_fit, replace=False)) if n_fit < total else np.arange(total)
    classes, class_codes = corpus_classes(shards, counts, models, layout) if models.fixed.indices else ({}, {})
    for i, c in class_codes.items():
        if (c < 0).any():      # cannot happen for sources; a taxonomy model gives only its labels
            raise HermesError(f"stage {i + 1}: {int((c < 0).sum())} documents have no class")
    if class_codes:
        picks = top_up(picks, class_codes, {i: len(v) for i, v in classes.items()}, cfg.min_points_per_code, rng)
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
