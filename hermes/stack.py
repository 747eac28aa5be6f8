"""The stage stack: what gives each of the three codes c1, c2, c3.

A stage is either learned or fixed:

- `learned`: a residual codebook fitted on the data (k-means initialised; with `transform: lst`
  trained jointly with the Learned Semantic Transform). The default stack is three learned stages.
- `source`: a fixed labeler, the document's source (the `source_field` of the records, or the
  input file's name where a record has none). Point `source_field` at any provenance field
  (a crawl, a language, a domain) to label by it.
- `fasttext`: a fixed labeler, the top label of a fastText taxonomy classifier (`model: FILE`),
  run on the same normalised text as the quality classifier.

A fixed stage's codeword for a class is the mean of that class's residuals in the transformed
space, so the stages after it quantize what the fixed label leaves unexplained; its code is the
class's index among the stage's sorted class names, and cell keys show the name
(`comp.12.7` rather than `3.12.7`).

In a config file the stack is a list of three entries, each a name or a mapping:

    stages: [source, learned, learned]
    stages:
      - {kind: fasttext, model: topics.bin}
      - learned
      - learned

and on the command line a comma-separated list: `--stages source,learned,learned`,
`--stages fasttext:topics.bin,learned,learned`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hermes.errors import HermesError

N_STAGES = 3
KINDS = ("learned", "source", "fasttext")
FIXED = ("source", "fasttext")
MAX_CLASSES = 32767          # codes are SMALLINT in the store
LEARNED = {"kind": "learned"}


def parse_stage(item: Any, origin: str, index: int) -> dict[str, Any]:
    """One entry of a stage list (a name, `fasttext:FILE`, or a mapping) as a normalised dict."""
    where = f"{origin}: stages[{index}]"
    if isinstance(item, str):
        kind, _, arg = item.strip().partition(":")
        item = {"kind": kind} if not arg else {"kind": kind, "model": arg}
    if not isinstance(item, dict) or "kind" not in item:
        raise HermesError(f"{where} = {item!r} is not a stage",
                          hint="a stage is learned, source, or {kind: fasttext, model: FILE}")
    kind = item["kind"]
    if kind not in KINDS:
        raise HermesError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    allowed = {"learned": {"kind"}, "source": {"kind"}, "fasttext": {"kind", "model"}}[kind]
    extra = sorted(set(item) - allowed)
    if extra:
        raise HermesError(f"{where}: a {kind} stage takes no key(s) {', '.join(extra)}",
                          hint=f"a {kind} stage takes: {', '.join(sorted(allowed))}")
    if kind == "fasttext":
        if not isinstance(item.get("model"), str) or not item["model"]:
            raise HermesError(f"{where}: a fasttext stage needs model: FILE (a fastText classifier .bin)")
        return {"kind": kind, "model": os.path.abspath(os.path.expanduser(item["model"]))}
    return {"kind": kind}


def parse_stages(value: Any, origin: str) -> list[dict[str, Any]]:
    """A stage list from a config file (a list) or the command line (a comma-separated string)."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or len(value) != N_STAGES:
        raise HermesError(f"{origin}: stages must list exactly {N_STAGES} stages (for c1, c2, c3), got {value!r}",
                          hint="e.g. stages: [source, learned, learned]")
    return [parse_stage(item, origin, i) for i, item in enumerate(value)]


def stage_text(stage: dict[str, Any]) -> str:
    """`source`, `learned`, `fasttext(topics.bin)`."""
    return stage["kind"] if stage["kind"] != "fasttext" else f"fasttext({Path(stage['model']).name})"


def describe(stack: list[dict[str, Any]]) -> str:
    """`source, learned, learned`."""
    return ", ".join(stage_text(s) for s in stack)


def is_fixed(stage: dict[str, Any]) -> bool:
    return stage["kind"] in FIXED


def fixed_indices(stack: list[dict[str, Any]]) -> list[int]:
    return [i for i, s in enumerate(stack) if is_fixed(s)]


class TaxonomyLabeler:
    """The top label of a fastText classifier, with the quality classifier's text normaliser."""

    def __init__(self, model: str):
        self.path = model
        self._model = None

    def setup(self) -> "TaxonomyLabeler":
        if self._model is None:
            from hermes.fasttext_quality import load_model

            if not Path(self.path).is_file():
                raise HermesError(f"{self.path}: fastText taxonomy model not found (stage kind fasttext, field 'model')",
                                  hint="train one with fastText, or change the stages setting")
            self._model = load_model(self.path)
        return self

    def classes(self) -> list[str]:
        """Every label the model can give, without the __label__ prefix, sorted."""
        self.setup()
        return sorted({_strip(lab) for lab in self._model.get_labels()})

    def labels(self, texts: list[str]) -> list[str]:
        from hermes.fasttext_quality import normalise

        self.setup()
        if not texts:
            return []
        predicted, _ = self._model.predict([normalise(t) for t in texts], k=1)
        return [_strip(p[0]) if len(p) else "" for p in predicted]


def _strip(label: str) -> str:
    return label[len("__label__"):] if label.startswith("__label__") else label


class FixedLabelers:
    """The fixed stages of a stack, loaded once; `labels()` gives each one's class name per document."""

    def __init__(self, stack: list[dict[str, Any]]):
        self.stack = stack
        self.indices = fixed_indices(stack)        # the stack's positions of its fixed stages
        self._taxonomy: dict[int, TaxonomyLabeler] = {}

    def setup(self) -> "FixedLabelers":
        for i in self.taxonomy:
            if i not in self._taxonomy:
                self._taxonomy[i] = TaxonomyLabeler(self.stack[i]["model"]).setup()
        return self

    def key(self) -> list:
        """What decides the class names: the stage kinds and the taxonomy models' contents."""
        out = []
        for i in self.indices:
            s = self.stack[i]
            out.append([i, s["kind"]] + ([s["model"], file_id(s["model"])] if s["kind"] == "fasttext" else []))
        return out

    @property
    def taxonomy(self) -> list[int]:
        """The fixed stages labeled by a fastText taxonomy (the others by the source)."""
        return [i for i in self.indices if self.stack[i]["kind"] == "fasttext"]

    def taxonomy_labels(self, texts: list[str]) -> dict[int, list[str]]:
        self.setup()
        return {i: self._taxonomy[i].labels(texts) for i in self.taxonomy}

    def labels(self, sources: list[str], texts: list[str]) -> dict[int, list[str]]:
        """Each fixed stage's class name per document."""
        taxonomy = self.taxonomy_labels(texts)
        return {i: taxonomy[i] if i in taxonomy else list(sources) for i in self.indices}

    def known_classes(self, i: int) -> list[str] | None:
        """A taxonomy stage's full label set (every label the model can give); None for source."""
        if self.stack[i]["kind"] != "fasttext":
            return None
        return self.setup()._taxonomy[i].classes()


def file_id(path: str | None) -> list | None:
    """[size, mtime_ns] of a file (None if there is none): cache keys change when a model file does."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if st else None


def check_class_count(stage: int, kind: str, n: int) -> None:
    if n > MAX_CLASSES:
        raise HermesError(f"stage {stage + 1} ({kind}) has {n:,} classes; a fixed stage holds at most {MAX_CLASSES:,}",
                          hint="label by a coarser field (--source-field) or make the stage learned")
    if n == 0:
        raise HermesError(f"stage {stage + 1} ({kind}) has no classes")
