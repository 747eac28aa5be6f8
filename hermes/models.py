"""The models a run labels with, loaded once per process on first use; the labelers over them
(hermes.labelers); and the keys of what they decide, made of those labelers' keys (the embedding
cache's and the label markers' settings)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from hermes._version import __version__
from hermes.config import Config
from hermes.embed import Embedder, TokenCounter, resolve_device, resolve_dtype
from hermes.labelers import ClassNames, Counts, Labeler, Quality, StaticTokens, StaticVectors, TransformerVectors
from hermes.read import Fields
from hermes.stack import FixedLabelers, file_id
from hermes.static import StaticEncoder


class Models:
    """The models the per-shard functions use, loaded once per process on first use."""

    def __init__(self, cfg: Config, embedding: dict[str, Any] | None = None,
                 stack: list[dict[str, Any]] | None = None, encoder_dir: Path | None = None,
                 encoder: StaticEncoder | None = None):
        self.cfg = cfg
        self.stack = stack or cfg.stages               # a substrate's own stack when labeling with it
        self.fixed = FixedLabelers(self.stack)
        emb = embedding or {}
        self.embedder: Embedder | StaticEncoder
        if emb.get("encoder") == "static":            # a substrate's static encoder, checked against it
            self.embedder = encoder or StaticEncoder.of_substrate(emb, encoder_dir)
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

    # ------------------------------------------------------------------ labelers
    def embedding(self, on_slice: Callable[[int], None] | None = None) -> list[Labeler]:
        """The embedding labelers: the static encoder's tokens (which count n_tokens too, unless
        --tokenizer names another) then its vectors, two steps that can run in two threads; or the
        transformer (`on_slice(n)` after each slice it embeds)."""
        if self.static:
            return [StaticTokens(self.embedder, counts=self.counts_with_encoder), StaticVectors(self.embedder)]
        return [TransformerVectors(self.embedder, self.embedding_settings(), ENCODE_SLICE, on_slice)]

    def counts(self) -> Counts:
        return Counts(lambda: self.counter, self.cfg.tokenizer)

    def quality(self) -> Quality:
        c = self.cfg
        return Quality(c.quality, c.quality_field, c.quality_model, c.quality_label,
                       file_id(c.quality_model) if c.quality == "fasttext" else None, lambda: self.quality_scorer)

    def class_names(self) -> ClassNames:
        return ClassNames(self.fixed)

    # ------------------------------------------------------------------ keys
    def cache_key(self) -> str:
        """What decides the whole cache of a shard: its embeddings and its document columns (the
        counts' and the quality's keys, and which field is the source)."""
        return _digest({"embed": self.embed_key(), "source_field": self.cfg.source_field,
                        **self.counts().key(), **self.quality().key()})

    def embed_key(self) -> str:
        """What decides the embeddings alone: the vectors labeler's key and the text and id fields.
        The other columns of the cache (source, counts, quality) can be redone without re-embedding."""
        c = self.cfg
        return _digest({"embedding": self.embedding_settings(), "fields": [c.text_field, c.id_field], "hermes": __version__,
                        "cache_format": CACHE_FORMAT})

    def classes_key(self) -> str:
        """What decides the taxonomy stages' labels of a shard: its documents and the models."""
        return _digest({"cache": self.cache_key(), **self.class_names().key()})


CACHE_FORMAT = 2         # the embedding cache's layout: 2 added the documents' read positions (column `read`)
ENCODE_SLICE = 512       # documents per transformer call (a progress line moves while a read batch is embedded)


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def models_for(cfg: Config, substrate) -> Models:
    """The models that label with `substrate`: its embedding settings and its own stage stack."""
    if getattr(substrate, "kind", "") != "embedding":      # a distilled substrate reads text only
        counted_with = cfg.tokenizer or substrate.n_tokens_tokenizer     # count n_tokens as its teacher did
        return Models(cfg.replace(tokenizer=counted_with) if counted_with else cfg,
                      stack=substrate.stages if substrate.fixed else None)
    return Models(cfg, embedding=substrate.embedding, stack=substrate.stages, encoder_dir=substrate.encoder_dir,
                  encoder=substrate.embedder() if substrate.static else None)   # the one the run checked


def reading_fields(cfg: Config) -> Fields:
    return Fields(text=cfg.text_field, id=cfg.id_field, source=cfg.source_field,
                  quality=cfg.quality_field if cfg.quality == "field" else None)
