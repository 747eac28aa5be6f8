"""Outputs are replaced whole or not at all."""

from __future__ import annotations

import pytest

from hermes.files import replacing, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    a.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(a, b) as (ta, tb):
            ta.write_text("new")
            tb.write_text("new")
            raise RuntimeError("disk full")
    assert a.read_text() == "old" and not b.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.txt"]


def test_a_complete_write_replaces_files_and_folders_in_order(tmp_path):
    folder, marker = tmp_path / "out", tmp_path / "done.json"
    folder.mkdir()
    (folder / "stale.txt").write_text("from before")
    with replacing(folder, marker) as (tf, tm):
        tf.mkdir()
        (tf / "fresh.txt").write_text("x")
        tm.write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["fresh.txt"] and marker.read_text() == "{}"
    assert not list(tmp_path.glob("*.tmp"))


def test_discard_keeps_what_was_there_and_a_leftover_temporary_is_cleared(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"v": 1})
    (tmp_path / "x.json.tmp").write_text("left by a killed run")
    with replacing(p) as staged:
        assert not staged[0].exists()              # cleared before the block
        staged[0].write_text("partial")
        staged.discard()
    assert p.read_text().strip() == '{\n "v": 1\n}' and not staged[0].exists()
