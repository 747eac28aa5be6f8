"""The transform between the embedding and the quantizer.

`identity` passes unit-norm embeddings through. The Learned Semantic Transform of the HERMES
method (a square linear map initialised at the identity, then normalisation, trained jointly
with the codebooks) takes this place: a transform has `fit(X)`, `transform(X)`, `state()` for
the arrays it saves and `from_state()` to load them.
"""

from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class IdentityTransform:
    kind = "identity"

    def fit(self, X: np.ndarray) -> "IdentityTransform":
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return normalize(np.asarray(X, dtype=np.float32))

    def params(self) -> dict:
        return {"kind": self.kind}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray]) -> "IdentityTransform":
        return cls()


TRANSFORMS = {"identity": IdentityTransform}


def make_transform(kind: str):
    try:
        return TRANSFORMS[kind]()
    except KeyError:
        from hermes.errors import HermesError

        raise HermesError(f"unknown transform {kind!r}", hint=f"valid: {', '.join(TRANSFORMS)}") from None
