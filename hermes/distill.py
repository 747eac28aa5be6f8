"""A distilled fast labeler: fastText classifiers that predict a store's code from text alone.

`distill` trains three fastText classifiers on (text, code) pairs of a labeled store and its
corpus: one for c1 (the L1 cell), one for the L12 cell, one for the L123 cell, and saves them as a
substrate of kind `distilled` that `hermes label` accepts; labeling with it needs no embedding
model. Decoding is hierarchical, so codes always form a valid path: c1 is the L1 model's top
label; (c1, c2) the L12 model's best label under c1 (among its top 20; else c1's most common
child in the training data); c3 likewise under (c1, c2). Held-out agreement with the teacher
substrate is measured at each level and kept in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hermes import __version__
from hermes.errors import HermesError
from hermes.fasttext_quality import _fasttext, normalise, train_supervised

LEVEL_KEYS = ("l1", "l12", "l123")
TOP_K = 20


def _key(codes, level: int) -> str:
    return ".".join(str(int(c)) for c in codes[:level])


class DistilledSubstrate:
    kind = "distilled"

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.m = manifest
        self.fingerprint = manifest["fingerprint"]
        self.fit_sample_size = manifest["data"]["train_docs"]
        self.embedding = None
        self.training = {"agreement": manifest["agreement"]}
        self._models: dict[str, Any] = {}

    @property
    def sizes(self) -> list[int]:
        return self.m["classes"]

    def setup(self) -> "DistilledSubstrate":
        if not self._models:
            ft = _fasttext()
            self._models = {k: ft.load_model(str(self.path / f"{k}.bin")) for k in LEVEL_KEYS}
        return self

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.setup()
        clean = [normalise(t) for t in texts]
        fb = self.m["fallback"]
        l1, _ = self._models["l1"].predict(clean, k=1)
        l12, _ = self._models["l12"].predict(clean, k=TOP_K)
        l123, _ = self._models["l123"].predict(clean, k=TOP_K)
        out = np.zeros((len(texts), 3), dtype=np.int16)
        for i in range(len(texts)):
            c1 = l1[i][0][len("__label__"):]
            k12 = next((lab[9:] for lab in l12[i] if lab[9:].split(".")[0] == c1), fb["l12"][c1])
            k123 = next((lab[9:] for lab in l123[i] if lab[9:].rsplit(".", 1)[0] == k12), fb["l123"][k12])
            out[i] = [int(x) for x in k123.split(".")]
        return out

    def manifest(self) -> dict[str, Any]:
        """In the shape the store's substrates table reads."""
        m = self.m
        return {**m, "embedding": {"model": f"distilled fastText (teacher {m['teacher']})", "dtype": None,
                                   "max_length": None},
                "transform": {"kind": "distilled"}, "rvq": {"sizes": m["classes"], "kind": "fasttext"},
                "fit_sample_size": self.fit_sample_size}


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(path: Path, manifest: dict[str, Any]) -> DistilledSubstrate:
    for k in LEVEL_KEYS:
        f = path / f"{k}.bin"
        if not f.is_file():
            raise HermesError(f"{f}: missing", hint="the distilled substrate is incomplete; run `hermes distill` again")
        if _sha_file(f) != manifest["files"][f"{k}.bin"]:
            raise HermesError(f"{f}: checksum does not match the manifest", hint="run `hermes distill` again")
    return DistilledSubstrate(path, manifest)


def _teacher_stack(con) -> list[dict[str, Any]] | None:
    """The teacher's stage stack with its fixed stages' class names, so that a store labeled by the
    distilled labeler names its cells as the teacher's store does."""
    from hermes.store import stage_names

    names = stage_names(con)
    if not names:
        return None
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'substrates'").fetchall()]
    stored = json.loads(con.execute("SELECT stages FROM substrates").fetchall()[0][0] or "null") \
        if "stages" in cols else None
    stack = stored or [{"kind": "learned"} for _ in range(3)]
    return [{**st, "classes": names[i]} if i in names else st for i, st in enumerate(stack)]


def distill(db: str | Path, out: str | Path, corpus: list[str] | None = None, sample: int = 200_000,
            holdout: float = 0.1, epochs: int = 25, dim: int = 100, bucket: int = 200_000, seed: int = 0,
            progress=None) -> dict[str, Any]:
    from hermes.read import lookup
    from hermes.store import connect, info_fields, store_info
    from hermes.substrate import FORMAT, FORMAT_VERSION

    say = progress or (lambda m: None)
    db, out = Path(db), Path(out)
    con = connect(db)
    try:
        fps = [r[0] for r in con.execute("SELECT DISTINCT substrate FROM labels").fetchall()]
        t = con.sql("SELECT doc_id, c1, c2, c3 FROM labels ORDER BY rowid").to_arrow_table()
        stack = _teacher_stack(con)
    finally:
        con.close()
    if len(fps) != 1:
        raise HermesError(f"{db}: the store holds labels of {len(fps)} substrates", hint="distill one substrate's store")
    rng = random.Random(seed)
    rows = list(range(t.num_rows))
    if len(rows) > sample:
        rows = sorted(rng.sample(rows, sample))
    ids = t.column("doc_id").take(rows).to_pylist()
    codes = np.stack([t.column(c).take(rows).to_numpy() for c in ("c1", "c2", "c3")], axis=1)
    info = store_info(db)
    say(f"distill: reading the text of {len(ids):,} documents")
    texts = lookup(corpus or info.get("inputs", []), info_fields(info), set(ids))
    pairs = [(normalise(texts[d]["text"]), c) for d, c in zip(ids, codes) if d in texts]
    if len(pairs) < 20:
        raise HermesError(f"only {len(pairs)} documents of the store were found in the corpus",
                          hint="pass the corpus the store was built from with --corpus")
    rng.shuffle(pairs)
    n_test = max(1, int(len(pairs) * holdout))
    test, train = pairs[:n_test], pairs[n_test:]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    # unigrams and 25 epochs: on the dev corpus (256 L1 cells) bigrams or 10 epochs underfit badly
    settings = {"epoch": epochs, "dim": dim, "bucket": bucket, "wordNgrams": 1, "minCount": 2, "lr": 0.5,
                "seed": seed, "thread": 1}
    used_seed: dict[str, int] = {}
    for level, key in enumerate(LEVEL_KEYS, start=1):
        say(f"distill: training the {key.upper()} classifier on {len(train):,} documents")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            for text, c in train:
                f.write(f"__label__{_key(c, level)} {text}\n")
            name = f.name
        try:
            _, used_seed[key] = train_supervised(name, tmp / f"{key}.bin", loss="softmax" if level == 1 else "hs",
                                                 **settings)
        finally:
            os.unlink(name)
    train_seconds = time.perf_counter() - t0
    counts12: dict[str, dict[str, int]] = {}
    counts123: dict[str, dict[str, int]] = {}
    for _, c in train:
        k1, k12, k123 = _key(c, 1), _key(c, 2), _key(c, 3)
        counts12.setdefault(k1, {}).setdefault(k12, 0)
        counts12[k1][k12] += 1
        counts123.setdefault(k12, {}).setdefault(k123, 0)
        counts123[k12][k123] += 1
    fallback = {"l12": {k: max(v, key=v.get) for k, v in counts12.items()},
                "l123": {k: max(v, key=v.get) for k, v in counts123.items()}}
    # every label a model can emit came from the training data, so each has a fallback child
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "distilled", "teacher": fps[0],
                "hermes_version": __version__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": {**settings, "seed_used": used_seed}, "data": {"store": str(db), "train_docs": len(train), "holdout_docs": len(test)},
                "classes": [len(set(_key(c, lv) for _, c in train)) for lv in (1, 2, 3)],
                "fallback": fallback, "agreement": {}, "stages": stack,
                "files": {f"{k}.bin": _sha_file(tmp / f"{k}.bin") for k in LEVEL_KEYS}}
    manifest["fingerprint"] = hashlib.sha256(json.dumps(
        {"teacher": fps[0], "settings": settings, "files": manifest["files"]}, sort_keys=True).encode()).hexdigest()[:16]
    sub = DistilledSubstrate(tmp, manifest)
    t0 = time.perf_counter()
    pred = sub.encode_texts([text for text, _ in test])
    predict_s = time.perf_counter() - t0
    truth = np.stack([c for _, c in test])
    manifest["agreement"] = {name: round(float((pred[:, :lv] == truth[:, :lv]).all(axis=1).mean()), 4)
                             for lv, name in ((1, "L1"), (2, "L12"), (3, "L123"))}
    manifest["train_seconds"] = round(train_seconds, 1)
    manifest["holdout_docs_per_s"] = round(len(test) / max(predict_s, 1e-9), 1)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"out": str(out), "fingerprint": manifest["fingerprint"], "teacher": fps[0],
            "agreement": manifest["agreement"], "classes": manifest["classes"], "train_docs": len(train),
            "holdout_docs": len(test), "train_seconds": manifest["train_seconds"],
            "holdout_docs_per_s": manifest["holdout_docs_per_s"]}
