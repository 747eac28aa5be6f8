"""The transform between the embedding and the quantizer.

- `lst` (default): the Learned Semantic Transform of HERMES, trained jointly with the codebooks
  (hermes.lst);
- `identity`: unit-norm embeddings as they are, quantized by the k-means-only RVQ ("plain-rvq").

A transform has `transform(X)`, `params()`, `state()` for the arrays it saves and `from_state()`
to load them.
"""

from __future__ import annotations

import numpy as np

from hermes.vectors import unit_rows


class IdentityTransform:
    kind = "identity"

    def fit(self, X: np.ndarray) -> "IdentityTransform":
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return unit_rows(np.asarray(X, dtype=np.float32))

    def params(self) -> dict:
        return {"kind": self.kind}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray]) -> "IdentityTransform":
        return cls()


TRANSFORMS = ("lst", "identity")


def transform_class(kind: str):
    """The class of a transform kind, as named in a substrate manifest."""
    if kind == "identity":
        return IdentityTransform
    if kind == "lst":
        from hermes.lst import LearnedSemanticTransform

        return LearnedSemanticTransform
    from hermes.errors import HermesError

    raise HermesError(f"unknown transform {kind!r}", hint=f"valid: {', '.join(TRANSFORMS)}")
