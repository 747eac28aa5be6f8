"""The labeler contract (hermes.labelers): same rows, same order, new columns; refused rows leave
before the next labeler; one loop, the same with labelers run a batch ahead in a thread."""

import numpy as np
import scipy.sparse as sp
import pyarrow as pa
import pytest

from hermes.config import load_config
from hermes.labelers import (REJECT, Batch, Classes, ClassNames, Labeler, StaticTokens, StaticVectors, apply, class_column,
                             class_name_column, label_batches)
from hermes.models import Models
from hermes.read import DOC_SCHEMA
from hermes.stack import FixedLabelers
from hermes.store import REJECT_FILE_SCHEMA

TEXTS = ["The cat sat on the mat.", "", "Quantum chromodynamics and gluons", "\x00\x01", "cat cat cat dog"]


def docs(texts, start=0, source="web"):
    n = len(texts)
    return pa.table({"doc_id": [f"d{start + i}" for i in range(n)], "text": texts, "source": [source] * n,
                     "line": list(range(start + 1, start + n + 1)), "quality": [None] * n}, schema=DOC_SCHEMA)


class Refuse(Labeler):
    """Refuses the texts that contain `word`, adds `seen_<word>` = the text's length."""

    def __init__(self, word):
        self.word, self.adds, self.seen = word, (f"seen_{word}",), []

    def __call__(self, batch):
        self.seen.extend(batch.column("doc_id").to_pylist())
        bad = np.array([self.word in t for t in batch.texts], bool)
        out = batch.with_columns(**{f"seen_{self.word}": pa.array([len(t) for t in batch.texts], pa.int64())})
        return out.refuse(bad, f"has {self.word}")


def test_refused_rows_leave_before_the_next_labeler():
    first, second = Refuse("cat"), Refuse("gluon")
    batch, rejects = apply(Batch(docs(TEXTS), "f.jsonl"), [first, second])
    assert first.seen == ["d0", "d1", "d2", "d3", "d4"]
    assert second.seen == ["d1", "d2", "d3"]                # d0 and d4 were refused by the first
    assert batch.column("doc_id").to_pylist() == ["d1", "d3"]
    assert batch.column("seen_cat").to_pylist() == [0, 2] and batch.column("seen_gluon").to_pylist() == [0, 2]
    assert REJECT not in batch.table.column_names
    assert batch.texts == ["", "\x00\x01"]                  # the shared views follow the rows
    got = [(t.column("doc_id").to_pylist(), t.column("reason").to_pylist(), t.column("file").to_pylist())
           for t in rejects]
    assert got == [(["d0", "d4"], ["has cat"] * 2, ["f.jsonl"] * 2), (["d2"], ["has gluon"], ["f.jsonl"])]


def test_a_row_keeps_its_first_reason():
    batch = Batch(docs(["a", "b"]), "f").refuse(np.array([True, False]), "first")
    batch = batch.refuse(np.array([True, True]), ["second", "second"])
    assert batch.column(REJECT).to_pylist() == ["first", "second"]


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_one_loop_the_same_with_labelers_run_ahead(ahead):
    reads = [(docs(TEXTS, 0), REJECT_FILE_SCHEMA.empty_table()),
             (docs(["no cat here", "plain"], 5),
              pa.table({"file": ["f"], "line": [99], "doc_id": [None], "reason": ["bad json"]}, schema=REJECT_FILE_SCHEMA)),
             (docs([], 7), REJECT_FILE_SCHEMA.empty_table())]
    out = list(label_batches(iter(reads), "f", [Refuse("cat"), Refuse("gluon")], ahead=ahead))
    assert [b.column("doc_id").to_pylist() for b, _, _ in out] == [["d1", "d3"], ["d6"], []]
    assert [r.column("reason").to_pylist() for _, r, _ in out] == [["has cat", "has cat", "has gluon"],
                                                                   ["bad json", "has cat"], []]
    assert [n for _, _, n in out] == [5, 3, 0]              # rows read, rejects included


def test_the_first_batch_goes_through_the_second_thread_in_smaller_pieces(monkeypatch):
    """With labelers run ahead, the first read batch is cut into pieces of RAMP's sizes (then the
    rest of it): every document once, in order, its read rejects with the first piece; later
    batches whole, and a first batch no larger than the first piece left whole."""
    from hermes import labelers

    monkeypatch.setattr(labelers, "RAMP", (2, 3))
    bad = pa.table({"file": ["f"], "line": [99], "doc_id": [None], "reason": ["bad json"]}, schema=REJECT_FILE_SCHEMA)
    first = [f"t{i}" for i in range(8)]
    reads = [(docs(first, 0), bad), (docs(["a", "b", "c"], 8), REJECT_FILE_SCHEMA.empty_table())]
    out = list(label_batches(iter(reads), "f", [Refuse("gluon"), Refuse("cat")], ahead=1))
    assert [b.column("doc_id").to_pylist() for b, _, _ in out] == [["d0", "d1"], ["d2", "d3", "d4"],
                                                                   ["d5", "d6", "d7"], ["d8", "d9", "d10"]]
    assert [r.column("reason").to_pylist() for _, r, _ in out] == [["bad json"], [], [], []]
    assert [n for _, _, n in out] == [3, 3, 3, 3]
    out = list(label_batches(iter([(docs(["a", "b"], 8), bad)]), "f", [Refuse("gluon")], ahead=1))
    assert [(b.column("doc_id").to_pylist(), n) for b, _, n in out] == [(["d8", "d9"], 3)]


def test_document_labelers_keep_rows_and_order(tmp_path):
    cfg = load_config()
    models = Models(cfg)
    batch = Batch(docs(TEXTS), "f")
    for labeler in (models.counts(), models.quality()):
        out = labeler.setup()(batch)
        assert out.column("doc_id").equals(batch.column("doc_id"))
        assert set(labeler.adds) <= set(out.table.column_names)
        batch = out
    assert batch.column("n_chars").to_pylist() == [len(t) for t in TEXTS]
    assert batch.column("n_tokens").to_pylist()[1] == 0 and batch.column("n_tokens").to_pylist()[0] > 5
    q = batch.column("quality").to_pylist()
    assert q[1] == 0.0 and q[0] > q[3]


def test_classes_refuse_a_class_the_substrate_lacks():
    class Sub:        # the two attributes Classes reads of a substrate
        fixed = [0]
        fingerprint = "abc"
        stages = [{"kind": "source", "source_field": "source", "classes": ["books", "web"]}]

    batch = Batch(docs(["a", "b"], source="web"), "f")
    batch = batch.with_columns(source=pa.array(["web", "forum"]))
    batch = ClassNames(FixedLabelers([{"kind": "source", "field": "source"}])).setup()(batch)
    assert batch.column(class_name_column(0)).to_pylist() == ["web", "forum"]
    labeled, rejects = apply(batch, [Classes(Sub())])
    assert labeled.column(class_column(0)).to_pylist() == [1]
    assert "source (field 'source') is not a class of stage 1 of substrate abc" in rejects[0].column("reason")[0].as_py()


def test_keys_come_from_the_labelers():
    cfg = load_config()
    base = Models(cfg)
    other_quality = Models(cfg.replace(quality="none"))
    assert other_quality.embed_key() == base.embed_key()              # the embeddings stay
    assert other_quality.cache_key() != base.cache_key()              # the document columns are redone
    assert base.quality().key() != other_quality.quality().key()
    assert Models(cfg.replace(max_length=128)).embed_key() != base.embed_key()


def test_static_tokens_and_vectors_refuse_texts_with_no_vector():
    """A text with no known token is refused when tokenized; one whose known tokens' vectors sum
    to zero, when its vector is made. The token ids travel with the batch, its refused rows gone."""
    from hermes.static import Tokens

    class Encoder:          # stands in for StaticEncoder.tokenize and .vectors
        def setup(self):
            return self

        def tokenize(self, texts):
            texts = texts.to_pylist()
            known = np.array([float(len(t.split())) for t in texts])
            return Tokens(sp.csr_matrix(np.eye(len(texts), 4) * known[:, None]), None, np.arange(len(texts)) + 10,
                          known, None)

        def vectors(self, tokens):
            v = tokens.bags.toarray().astype(np.float32)
            ok = tokens.counts != 12            # the text with count 12 sums to zero
            return v * ok[:, None], ok

    texts = ["a", " ", "b c", "d"]
    batch, rejects = apply(Batch(docs(texts), "f"), [StaticTokens(Encoder(), counts=True), StaticVectors(Encoder())])
    assert batch.column("doc_id").to_pylist() == ["d0", "d3"]
    assert batch.column("n_tokens").to_pylist() == [10, 13]
    assert np.array_equal(batch.vectors(), np.eye(4, dtype=np.float32)[[0, 3]])
    assert [r.column("doc_id").to_pylist() for r in rejects] == [["d1"], ["d2"]]


def test_cached_vectors_are_the_cache_rows_of_the_batch():
    from hermes.labelers import CachedVectors

    cache = np.arange(24, dtype=np.float16).reshape(6, 4)
    for rows in ([2, 3, 4], [5, 0, 3], []):
        batch = Batch(docs(["x"] * len(rows)), "f").with_columns(row=pa.array(rows, pa.int64()))
        got = CachedVectors(cache)(batch).vectors()
        assert got.shape == (len(rows), 4) and np.array_equal(got, cache[rows])


def test_an_empty_batch_keeps_the_vectors_dimension():
    """A read batch whose records were all rejected: the embedding column still has the model's
    dimension (the cache marker records it, and reads the file by it)."""
    models = Models(load_config())
    out, _ = apply(Batch(docs([]), "f"), [labeler.setup() for labeler in models.embedding()])
    assert out.vectors().shape == (0, models.embedder.dim_) and models.embedder.dim_ > 1
