"""Configuration: defaults < --config file < flags; unknown keys are named."""

from __future__ import annotations

import pytest
import yaml

from hermes.config import default_config_path, load_config
from hermes.errors import HermesError


def test_default_file_holds_every_setting():
    cfg = load_config()
    keys = set(yaml.safe_load(default_config_path().read_text()))
    assert keys == set(cfg.to_dict())
    assert cfg.codebook_size is None and cfg.codebook_sizes is None and cfg.model == "all-MiniLM-L6-v2"


def test_flag_beats_file_beats_default(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_length: 64\nseed: 7\n")
    cfg = load_config(f, overrides={"seed": 11, "batch_size": None})
    assert cfg.max_length == 64        # from the file
    assert cfg.seed == 11              # the flag wins
    assert cfg.batch_size == load_config().batch_size   # None = flag not given


def test_unknown_keys_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_lenght: 64\ncodebooks: 3\n")
    with pytest.raises(HermesError, match=r"unknown config key\(s\): codebooks, max_lenght"):
        load_config(f)


@pytest.mark.parametrize("text, message", [("dtype: fp8\n", "dtype = 'fp8' is not one of"),
                                           ("batch_size: 0\n", "batch_size must be a positive integer"),
                                           ("codebook_size: 1\n", "codebook_size must be an integer >= 2 or null"),
                                           ("device: gpu\n", "device = 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
                                           ("codebook_sizes: [8, 8]\n", "codebook_sizes must be a list of 3"),
                                           ("codebook_size: 8\ncodebook_sizes: [8, 8, 8]\n", "are both set"),
                                           ("stages: [source, learned, learned]\ncodebook_sizes: [8, 8, 8]\n",
                                            r"codebook_sizes\[0\] = 8: stage 1 is source; .* for a fixed one"),
                                           ("codebook_sizes: [null, 8, 8]\n", r"codebook_sizes\[0\] = null: stage 1 is learned"),
                                           ("a: [\n", "not valid YAML")])
def test_bad_values_are_errors(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(HermesError, match=message):
        load_config(f)


def test_a_size_setting_replaces_the_other_one_from_a_lower_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("codebook_size: 256\n")
    cfg = load_config(f, {"codebook_sizes": [8, 8, 8]})           # the flag beats the file
    assert cfg.codebook_sizes == [8, 8, 8] and cfg.codebook_size is None
    f.write_text("codebook_sizes: [8, 8, 8]\n")
    cfg = load_config(f, {"codebook_size": 16})
    assert cfg.codebook_size == 16 and cfg.codebook_sizes is None
    assert load_config(f).codebook_sizes == [8, 8, 8]
