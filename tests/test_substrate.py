"""The substrate folder: save/load/encode identity, and clear errors for damaged folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hermes.errors import HermesError
from hermes.rvq import ResidualQuantizer
from hermes.substrate import Substrate
from hermes.transform import IdentityTransform


@pytest.fixture()
def saved(tmp_path, real_embeddings):
    q = ResidualQuantizer(codebook_size=8, min_points_per_code=5, seed=0).fit(real_embeddings)
    sub = Substrate(embedding={"model": "m", "dtype": "fp32", "max_length": 128, "dim": 384},
                    transform=IdentityTransform(), quantizer=q, fit_sample_size=len(real_embeddings))
    sub.save(tmp_path / "substrate")
    return sub, tmp_path / "substrate"


def test_save_load_encode_gives_the_same_codes(saved, real_embeddings):
    sub, path = saved
    loaded = Substrate.load(path)
    assert loaded.fingerprint == sub.fingerprint
    assert np.array_equal(loaded.encode(real_embeddings), sub.encode(real_embeddings))
    assert not list(path.glob("*.pkl")) and (path / "manifest.json").is_file()


def test_fingerprint_changes_with_settings_and_arrays(saved, real_embeddings):
    sub, _ = saved
    other = Substrate(embedding={**sub.embedding, "dtype": "bf16"}, transform=sub.transform,
                      quantizer=sub.quantizer, fit_sample_size=sub.fit_sample_size)
    assert other.compute_fingerprint() != sub.compute_fingerprint()
    q2 = ResidualQuantizer(codebook_size=8, min_points_per_code=5, seed=9).fit(real_embeddings)
    third = Substrate(embedding=sub.embedding, transform=sub.transform, quantizer=q2,
                      fit_sample_size=sub.fit_sample_size)
    assert third.compute_fingerprint() != sub.compute_fingerprint()


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "codebook_2.npy").unlink(), "codebook_2.npy: missing or unreadable"),
    (lambda p: np.save(p / "codebook_1.npy", np.zeros((8, 384), np.float32)), "checksum does not match"),
    (lambda p: _edit_manifest(p, format_version=99), "format_version 99"),
    (lambda p: _edit_manifest(p, fit_sample_size=1), "fingerprint does not match"),
    (lambda p: (p / "manifest.json").write_text("{oops"), "corrupt manifest"),
    (lambda p: (p / "manifest.json").unlink(), "not a substrate folder"),
])
def test_damaged_substrate_is_refused_with_a_clear_error(saved, damage, message):
    _, path = saved
    damage(path)
    with pytest.raises(HermesError, match=message):
        Substrate.load(path)


def test_the_identity_transform_end_to_end(sample_records, tmp_path):
    """transform: identity (plain RVQ) through `hermes run`: the substrate says so, and every stored
    code is the plain quantizer's code of the document's unit embedding."""
    import duckdb

    from hermes.layout import cached_embeddings
    from tests.conftest import invoke, write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", sample_records[:150])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("transform: identity\n")
    r = invoke("run", corpus, "--out", tmp_path / "o", "--config", cfg, "--keep-embeddings", "--max-length", "32",
               "--codebook-sizes", "3,2,2", "--quiet", "--encoder", "transformer")
    assert r.exit_code == 0, r.output
    sub = Substrate.load(tmp_path / "o" / "substrate")
    assert sub.transform.kind == "identity" and "history" not in sub.training
    con = duckdb.connect(str(tmp_path / "o" / "labels.duckdb"), read_only=True)
    rows = con.execute("SELECT doc_id, c1, c2, c3 FROM labels").fetchall()
    con.close()
    E = cached_embeddings(tmp_path / "o" / "embeddings", [d for d, *_ in rows])
    unit = E / np.linalg.norm(E, axis=1, keepdims=True)
    assert np.array_equal(sub.quantizer.encode(unit), np.array([c for _, *c in rows]))
