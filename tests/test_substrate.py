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
