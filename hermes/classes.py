"""The fixed stages' classes of cached documents: each document's class name (its source, or a
fastText taxonomy's label, cached beside its embeddings) and a corpus's class list per stage. The
codes of those names under a substrate are the `Classes` labeler's (hermes.labelers)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hermes.files import write_parquet
from hermes.labelers import class_indices
from hermes.layout import Layout, cached_texts
from hermes.models import Models
from hermes.read import Shard
from hermes.stack import check_class_count


CLASSES_KEY = b"hermes_classes_key"


def taxonomy_labels(shard: Shard, models: Models, layout: Layout) -> pa.Table:
    """The taxonomy stages' labels of a shard's cached documents (columns stage_<i>), computed from
    the text once and cached beside the embeddings, so changing the stage stack never re-embeds."""
    path = layout.classes_file(shard)
    key = models.classes_key().encode()
    if path.is_file():
        try:
            if (pq.read_schema(path).metadata or {}).get(CLASSES_KEY) == key:
                return pq.read_table(path)
        except (OSError, pa.ArrowException):
            pass
    columns: dict[str, list[str]] = {f"stage_{i}": [] for i in models.fixed.taxonomy}
    for texts in cached_texts(shard, models, pq.ParquetFile(layout.docs_file(shard)).metadata.num_rows, layout):
        for i, names in models.fixed.taxonomy_labels(texts).items():
            columns[f"stage_{i}"].extend(names)
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}).replace_schema_metadata({CLASSES_KEY: key})
    write_parquet(path, table)
    return table


def shard_classes(shard: Shard, models: Models, layout: Layout) -> dict[int, pa.Array]:
    """Each fixed stage's class name for every cached document of the shard, in cache order."""
    out: dict[int, pa.Array] = {}
    if models.fixed.taxonomy:
        taxonomy = taxonomy_labels(shard, models, layout)
        out.update({i: taxonomy.column(f"stage_{i}").combine_chunks() for i in models.fixed.taxonomy})
    if len(out) < len(models.fixed.indices):
        source = pq.read_table(layout.docs_file(shard), columns=["source"]).column("source").combine_chunks()
        out.update({i: source for i in models.fixed.indices if i not in out})
    return out


def corpus_classes(shards: list[Shard], counts: list[int], models: Models, layout: Layout,
                   names_of: Callable[[Shard], dict[int, pa.Array]] | None = None
                   ) -> tuple[dict[int, list[str]], dict[int, np.ndarray]]:
    """For each fixed stage: its sorted class names (a taxonomy model's labels, or every source in
    the corpus) and each document's class index over the whole corpus (int32, corpus order).
    `names_of(shard)`: each stage's class name per document (default: from the embedding cache)."""
    shard_classes_of = names_of or (lambda shard: shard_classes(shard, models, layout))
    live = [s for s, n in zip(shards, counts) if n]
    classes: dict[int, list[str]] = {i: models.fixed.known_classes(i) for i in models.fixed.indices}
    if any(v is None for v in classes.values()):       # sources: every name in the corpus (one pass)
        seen: dict[int, set[str]] = {i: set() for i, v in classes.items() if v is None}
        for shard in live:
            names = shard_classes_of(shard)
            for i in seen:
                seen[i].update(v for v in pc.unique(names[i]).to_pylist() if v is not None)
                check_class_count(i, models.stack[i]["kind"], len(seen[i]))     # fail early on an id-like field
        classes.update({i: sorted(v) for i, v in seen.items()})
    for i, known in classes.items():
        check_class_count(i, models.stack[i]["kind"], len(known))
    codes: dict[int, list[np.ndarray]] = {i: [] for i in classes}      # a second pass: int32 per document
    for shard in live:
        names = shard_classes_of(shard)
        for i, known in classes.items():
            codes[i].append(class_indices(names[i], known).astype(np.int32))
    return classes, {i: np.concatenate(c) for i, c in codes.items()}
