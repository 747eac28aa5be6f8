"""fastText quality: score documents with a fastText classifier, and train one.

One text normaliser serves training and prediction (fastText's predict refuses newlines):
whitespace runs, newlines included, become one space.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hermes.errors import HermesError

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"


def normalise(text: str) -> str:
    return " ".join(text.split())


def _fasttext():
    try:
        import fasttext
    except ImportError:
        raise HermesError("fastText is not installed", hint="pip install fasttext-numpy2") from None
    fasttext.FastText.eprint = lambda *a, **k: None     # silence its load warning
    return fasttext


# fastText training in a bare interpreter that imports fastText and nothing else. In this fastText
# build training can diverge (NaN) depending on the process it runs in: a second training in one
# process, or a child that re-imports the caller's modules (multiprocessing's spawn does: from the
# `hermes` command every training of one data set diverged, from a plain script none did).
_TRAIN = """\
import json, sys
import fasttext
a = json.loads(sys.argv[1])
try:
    fasttext.train_supervised(input=a["input"], verbose=0, **a["settings"]).save_model(a["output"])
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""


def train_supervised(train_file: str, model_file: str | Path, **kwargs):
    """fastText supervised training in a fresh, bare Python process, retried with the next seed on
    NaN. Returns the loaded model and the seed used."""
    import subprocess
    import sys

    seed = int(kwargs.pop("seed", 0))
    error = None
    for attempt in range(4):
        job = {"input": str(train_file), "output": str(model_file), "settings": {**kwargs, "seed": seed + attempt}}
        r = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(job)], capture_output=True, text=True)
        if r.returncode == 0:
            return load_model(model_file), seed + attempt
        lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
        error = lines[-1] if lines else f"exit code {r.returncode}"
        if "NaN" not in error:
            break
    raise HermesError(f"fastText training failed: {error}", hint="try other --epochs or --lr")


def load_model(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise HermesError(f"{p}: fastText model not found", hint="pass a .bin file to --quality-model")
    try:
        return _fasttext().load_model(str(p))
    except ValueError as e:
        raise HermesError(f"{p}: not a fastText model ({e})",
                          hint="pass a .bin file written by fastText (e.g. by `hermes train-quality`)") from None


class FastTextScorer:
    """Probability of `label` under a fastText classifier; the model loads in setup()."""

    def __init__(self, path: str | Path, label: str):
        self.path = str(path)
        self.label = label
        self._model: Any = None

    def setup(self) -> "FastTextScorer":
        if self._model is None:
            model = load_model(self.path)
            labels = list(model.get_labels())
            if self.label not in labels:
                raise HermesError(f"{self.path}: the model has no label '{self.label}' (field 'quality_label')",
                                  hint=f"its labels: {', '.join(labels[:20])}")
            self._model = model
        return self

    def scores(self, texts: list[str]) -> np.ndarray:
        self.setup()
        labels, probs = self._model.predict([normalise(t) for t in texts], k=-1)
        out = np.zeros(len(texts), dtype=np.float64)
        for i, (ls, ps) in enumerate(zip(labels, probs)):
            for lab, p in zip(ls, ps):
                if lab == self.label:
                    out[i] = min(1.0, float(p))
                    break
        return out


def _texts(inputs: list[str], text_field: str, limit: int | None) -> list[str]:
    from hermes.read import Fields, discover, read_shard

    out: list[str] = []
    for shard in discover(inputs):
        for docs, _ in read_shard(shard, Fields(text=text_field)):
            out.extend(docs.column("text").to_pylist())
            if limit and len(out) >= limit:
                return out[:limit]
    return out


def train_quality(positive: Iterable[str], negative: Iterable[str], out: str | Path, text_field: str = "text",
                  holdout: float = 0.1, epochs: int = 5, lr: float = 0.1, word_ngrams: int = 2, dim: int = 64,
                  bucket: int = 200_000, min_count: int = 2, seed: int = 0, limit: int | None = None
                  ) -> dict[str, Any]:
    """Train a fastText classifier (__label__hq vs __label__lq); report held-out precision, recall
    and AUC; write OUT/model.bin and OUT/card.json."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    if not 0 < holdout < 1:
        raise HermesError(f"--holdout {holdout} must be between 0 and 1")
    pos, neg = _texts(list(positive), text_field, limit), _texts(list(negative), text_field, limit)
    if len(pos) < 5 or len(neg) < 5:
        raise HermesError(f"{len(pos)} positive and {len(neg)} negative documents; each side needs at least 5",
                          hint="check the inputs and --text-field")
    rng = random.Random(seed)
    data = [(POSITIVE, normalise(t)) for t in pos] + [(NEGATIVE, normalise(t)) for t in neg]
    rng.shuffle(data)
    n_test = max(2, int(len(data) * holdout))
    test, train = data[:n_test], data[n_test:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        for label, text in train:
            f.write(f"{label} {text}\n")
        train_file = f.name
    try:
        settings = {"epoch": epochs, "lr": lr, "wordNgrams": word_ngrams, "dim": dim, "bucket": bucket,
                    "minCount": min_count, "seed": seed, "thread": 1, "loss": "softmax"}
        model, settings["seed"] = train_supervised(train_file, out / "model.bin", **settings)
    finally:
        os.unlink(train_file)
    seconds = time.perf_counter() - t0
    scorer = FastTextScorer(out / "model.bin", POSITIVE)
    scorer._model = model
    y = np.array([1 if lab == POSITIVE else 0 for lab, _ in test])
    p = scorer.scores([t for _, t in test])
    metrics = {"holdout_docs": int(len(test)), "precision": round(float(precision_score(y, p >= 0.5, zero_division=0)), 4),
               "recall": round(float(recall_score(y, p >= 0.5, zero_division=0)), 4),
               "auc": round(float(roc_auc_score(y, p)), 4) if len(set(y)) > 1 else None}
    card = {"model": "model.bin", "labels": {"positive": POSITIVE, "negative": NEGATIVE},
            "use": f"hermes run CORPUS --quality fasttext --quality-model {out / 'model.bin'} --quality-label {POSITIVE}",
            "data": {"positive": list(positive), "negative": list(negative), "text_field": text_field,
                     "positive_docs": len(pos), "negative_docs": len(neg), "train_docs": len(train),
                     "holdout": holdout},
            "normaliser": "whitespace runs (newlines included) -> one space; the same at prediction",
            "settings": settings, "train_seconds": round(seconds, 2), "metrics": metrics,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return {"out": str(out), **card}
