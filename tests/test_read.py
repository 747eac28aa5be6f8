"""Readers: every format, dotted fields, deterministic ids, and every bad record."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hermes.errors import HermesError
from hermes.read import Fields, check_fields, discover, read_shard
from tests.conftest import BAD_LINES, INVALID_UTF8, write_jsonl

RECS = [{"id": f"d{i}", "text": f"document number {i} about topic {i % 3}", "source": "web",
         "meta": {"body": f"nested body {i}", "site": f"s{i % 2}"}} for i in range(10)]


def read_all(paths, fields=Fields(), batch_size=4):
    docs, rejects = [], []
    for shard in discover([str(p) for p in paths]):
        for table, bad in read_shard(shard, fields, batch_size):
            docs.extend(table.to_pylist())
            rejects.extend(bad)
    return docs, rejects


def test_jsonl_plain_gz_zst_read_the_same(tmp_path):
    import zstandard

    plain = write_jsonl(tmp_path / "c.jsonl", RECS)
    data = plain.read_bytes()
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "c.jsonl.gz", "wb") as f:
        f.write(data)
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    base, _ = read_all([plain])
    for p in (tmp_path / "gz" / "c.jsonl.gz", tmp_path / "zst" / "c.jsonl.zst"):
        docs, rejects = read_all([p])
        assert [d["text"] for d in docs] == [d["text"] for d in base]
        assert [d["doc_id"] for d in docs] == [f"d{i}" for i in range(10)]
        assert not rejects


def test_parquet_csv_tsv_and_dotted_fields(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECS), tmp_path / "c.parquet")
    flat = [{"id": r["id"], "text": r["text"], "source": r["source"]} for r in RECS]
    for name, delim in (("c.csv", ","), ("c.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "text", "source"], delimiter=delim)
            w.writeheader()
            w.writerows(flat)
    for name in ("c.parquet", "c.csv", "c.tsv"):
        docs, rejects = read_all([tmp_path / name])
        assert [d["doc_id"] for d in docs] == [r["id"] for r in RECS], name
        assert [d["text"] for d in docs] == [r["text"] for r in RECS], name
        assert not rejects
    docs, _ = read_all([tmp_path / "c.parquet"], Fields(text="meta.body", id="id", source="meta.site"))
    assert docs[3]["text"] == "nested body 3" and docs[3]["source"] == "s1"


def test_hf_dataset_and_txt_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECS[:5]).save_to_disk(str(tmp_path / "hfds"))
    docs, _ = read_all([tmp_path / "hfds"])
    assert [d["doc_id"] for d in docs] == ["d0", "d1", "d2", "d3", "d4"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECS[:3]),
                          "test": datasets.Dataset.from_list(RECS[3:5])}).save_to_disk(str(tmp_path / "hfdd"))
    docs, _ = read_all([tmp_path / "hfdd"])
    assert sorted(d["doc_id"] for d in docs) == ["d0", "d1", "d2", "d3", "d4"]

    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(3):
        (txt / f"{i}.txt").write_text(f"plain text file {i}")
    (txt / "bad.txt").write_bytes(b"\xff\xfe broken")
    docs, rejects = read_all([txt])
    assert [d["doc_id"] for d in docs] == ["txt/0.txt", "txt/1.txt", "txt/2.txt"]
    assert len(rejects) == 1 and "invalid UTF-8" in rejects[0].reason


def test_doc_ids_derived_deterministically_when_records_have_none(tmp_path):
    recs = [{"text": r["text"]} for r in RECS[:4]]
    p = write_jsonl(tmp_path / "noid.jsonl", recs)
    first, _ = read_all([p])
    second, _ = read_all([p])
    assert [d["doc_id"] for d in first] == ["noid.jsonl:1", "noid.jsonl:2", "noid.jsonl:3", "noid.jsonl:4"]
    assert first == second
    assert {d["source"] for d in first} == {"noid.jsonl"}   # no source field: the file's name


def test_every_bad_record_is_rejected_with_line_and_reason(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", RECS[:2], BAD_LINES)
    with open(p, "ab") as f:
        f.write(INVALID_UTF8)
    docs, rejects = read_all([p])
    assert len(docs) == 2
    by_line = {r.line: r for r in rejects}
    assert by_line[3].reason.startswith("invalid JSON")
    assert by_line[4].reason == "missing text field 'text'" and by_line[4].doc_id == "no-text"
    assert "not a string" in by_line[5].reason
    assert by_line[6].reason.startswith("empty text")
    assert "not an object" in by_line[7].reason
    assert by_line[8].reason.startswith("invalid UTF-8")
    assert all(r.file == "bad.jsonl" for r in rejects)
    assert len(docs) + len(rejects) == 2 + len(BAD_LINES) + 1


def test_globs_and_folders(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "skip.md"):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / name).write_text(json.dumps({"id": name, "text": "hello world"}) + "\n")
    assert [s.name for s in discover([str(tmp_path / "corpus")])] == ["corpus/a.jsonl", "corpus/b.jsonl"]
    assert [s.name for s in discover([str(tmp_path / "corpus" / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.jsonl", "no such file"),
    (lambda p: (p / "x.docx").write_text("?") and p / "x.docx", "unknown corpus format"),
    (lambda p: p / "nomatch*.jsonl", "matches no file"),
])
def test_bad_inputs_raise_one_clear_error(tmp_path, make, message):
    with pytest.raises(HermesError, match=message):
        discover([str(make(tmp_path))])


def test_missing_text_field_names_the_fields_that_exist(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", RECS)
    with pytest.raises(HermesError) as e:
        check_fields(discover([str(p)]), Fields(text="content"))
    msg = str(e.value)
    assert "c.jsonl" in msg and "'content'" in msg and "meta.body" in msg and "--text-field" in msg


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(HermesError, match="broken.parquet: not a readable Parquet file"):
        read_all([p])


def test_truncated_gzip_is_a_clear_error(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(("\n".join(json.dumps(r) for r in RECS * 50)).encode())
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(HermesError, match="t.jsonl.gz:.*cannot decompress"):
        read_all([p])


def test_large_files_are_cut_into_row_ranges_that_read_the_same(tmp_path):
    recs = [{"text": f"line {i} " + "x" * (i % 37)} for i in range(200)]     # no ids: derived from lines
    p = write_jsonl(tmp_path / "big.jsonl", recs, ["{broken"])
    whole, whole_rej = read_all([p])
    shards = discover([str(p)], max_bytes=700)
    assert len(shards) > 5 and len({s.key for s in shards}) == len(shards)
    docs, rejects = [], []
    for shard in shards:
        for table, bad in read_shard(shard, Fields(), 16):
            docs.extend(table.to_pylist())
            rejects.extend(bad)
    assert docs == whole and [r.line for r in rejects] == [r.line for r in whole_rej] == [201]

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "big.parquet", row_group_size=30)
    parts = discover([str(tmp_path / "big.parquet")], max_rows=50)
    assert len(parts) == 4
    docs = [d for s in parts for t, _ in read_shard(s, Fields(), 16) for d in t.to_pylist()]
    assert [d["doc_id"] for d in docs] == [f"big.parquet:{i + 1}" for i in range(200)]


# Lines on which Arrow's JSON reader and the line reader could disagree: each must come out as the
# line reader gives it (the block that holds it goes through the line reader).
ODD_LINES = [
    b'{"id": "a", "text": "hello"}', b"", b"   ", b"\r", b'{"id": 5, "text": "an integer id"}', b'{"text": "no id"}',
    b'{"id": "", "text": "empty id"}', b'{"id": " ", "text": "blank id"}', b'{"id": true, "text": "bool id"}',
    b'{"id": 1.5, "text": "float id"}', b'{"id": 123456789012345678901234, "text": "huge id"}', b'{"id": -3, "text": "neg"}',
    b'{"id": "b", "text": 7}', b'{"id": "c"}', b'{"id": "d", "text": null}', b'{"id": "e", "text": " \\t "}',
    b'{"id": "f", "text": "\\u3000\\u2028\\u001c"}', b'{"id": "g", "text": "\\ud800 lone surrogate"}',
    b'{"id": "h", "text": "\\ud83d\\ude00 a pair"}', b"[1, 2]", b"not json", b'{"id": "i", "text": "x\xffy"}',
    b'{"id": "j", "text": "x", "source": "src"}', b'{"id": "k", "text": "x", "source": 5}', b'{"id": "k2", "text": "x", "source": null}',
    b'{"id": "l", "text": "x"} {"id": "m", "text": "two on a line"}', b'\xef\xbb\xbf{"id": "n", "text": "bom"}',
    b'{"id": "o", "text": "dup", "text": "again"}', b'{"id": "p", "text": "crlf"}\r', b'{"id": "q", "text": "x", "n": 1e999}',
    b'{"id": "r", "text": "tab\tinside"}', b'{"id": "s", "text": "nul \\u0000 escaped", "x": {"deep": [1, null]}}',
    b'{"id": "t1", "text": "cut short"', b'{"id": "t2", "text":', b'{"id": "t3", "text": "abc', b'{"id": "t4", "text": "e"\r',
]


def _by_lines(shard, fields, batch_size):
    """read_shard with every block read line by line."""
    import hermes.read as read

    real, read._block_readable = read._block_readable, lambda shard, fields: False
    try:
        return list(read_shard(shard, fields, batch_size))
    finally:
        read._block_readable = real


@pytest.mark.parametrize("block", [64, 300, 1 << 20])
def test_jsonl_read_by_blocks_equals_reading_line_by_line(tmp_path, monkeypatch, block):
    """Arrow's JSON reader takes the blocks of a JSONL file where it reads them as the line reader
    does; every other block goes line by line: the same documents, rejects and line numbers, in
    the same batches where nothing is rejected."""
    import hermes.read as read

    monkeypatch.setattr(read, "JSONL_BLOCK", block)
    good = [json.dumps({"id": f"g{i}", "text": f"good text {i}", "source": f"s{i % 3}"}).encode() for i in range(60)]
    files = {"odd.jsonl": ODD_LINES, "good.jsonl": good, "mixed.jsonl": good[:30] + ODD_LINES + good[30:],
             "noid.jsonl": [json.dumps({"text": f"t {i}"}).encode() for i in range(40)],
             "intid.jsonl": [json.dumps({"id": i, "text": f"t {i}"}).encode() for i in range(40)],
             # a blank line and two records on one line: as many records as lines, yet not one a line
             "blank_and_two.jsonl": good[:3] + [b"", b'{"id": "x", "text": "x"} {"id": "y", "text": "y"}'] + good[3:6],
             "bom_first.jsonl": [b'\xef\xbb\xbf{"id": "n", "text": "a byte-order mark"}'] + good[:3],
             # records spread over lines, as many records as lines: Arrow would read them
             "spread.jsonl": good[:3] + [b'{"text": "x"}{"text": "y",', b'"id": "b"}', b'{"text": "z"}\r{"text":', b'"w"}'] + good[3:6],
             "long.jsonl": good[:2] + [json.dumps({"id": "long", "text": "word " * 600_000}).encode()] + good[2:4]}
    files.update({f"odd{i}.jsonl": good[:3] + [line] + good[3:6] for i, line in enumerate(ODD_LINES)})
    for name, lines in files.items():
        (tmp_path / name).write_bytes(b"\n".join(lines) + (b"\n" if name != "noid.jsonl" else b""))
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
    shards = discover([str(tmp_path)]) + discover([str(tmp_path / "mixed.jsonl")], max_bytes=500)
    assert len(shards) > len(files) * 2 + 3
    for shard in shards:
        for batch_size in (1, 7, 2048):
            fast = list(read_shard(shard, Fields(), batch_size))
            slow = _by_lines(shard, Fields(), batch_size)
            rejects = [vars(r) for _, bad in slow for r in bad]
            assert [vars(r) for _, bad in fast for r in bad] == rejects, shard
            assert pa.concat_tables([t for t, _ in fast]).equals(pa.concat_tables([t for t, _ in slow])), shard
            assert all(t.column("text").num_chunks == 1 for t, _ in fast)
            if not rejects:
                assert [t.num_rows for t, _ in fast] == [t.num_rows for t, _ in slow]
    docs = {d["doc_id"]: d for t, _ in read_shard(discover([str(tmp_path / "odd.jsonl")])[0], Fields(), 7)
            for d in t.to_pylist()}
    assert docs["5"]["line"] == 5 and docs["odd.jsonl:6"]["text"] == "no id" and docs["k2"]["source"] == "odd.jsonl"
    # the clean files never went line by line
    lines_read = []
    monkeypatch.setattr(read, "_jsonl_item", lambda n, raw: lines_read.append(n))
    for name in ("good.jsonl", "noid.jsonl", "intid.jsonl", "good.jsonl.gz", "long.jsonl"):
        assert sum(t.num_rows for t, _ in read_shard(discover([str(tmp_path / name)])[0])) in (5, 40, 60)
    assert lines_read == []


def test_records_beyond_pythons_json_are_rejected_not_a_crash(tmp_path):
    """An integer of more digits than Python converts, or nesting past its recursion limit: the line
    reader rejects the line with a reason instead of failing the run."""
    lines = [b'{"id": "a", "text": "ok"}', b'{"id": "b", "text": "x", "n": ' + b"7" * 5000 + b"}",
             b'{"id": "c", "text": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"{broken"]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    docs, rejects = read_all([tmp_path / "c.jsonl"])
    assert [d["doc_id"] for d in docs] == ["a"]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [(2, "invalid JSON"), (3, "invalid JSON"), (4, "invalid JSON")]
    assert "nested too deeply" in rejects[1].reason


def test_the_blank_text_check_knows_pythons_whitespace():
    """A text of str.isspace() characters alone is empty to the line reader (str.strip()); the
    block reader's check must know the same characters."""
    from hermes.read import PY_WHITESPACE

    assert set(PY_WHITESPACE) == {c for c in map(chr, range(0x110000)) if c.isspace()}


@pytest.mark.parametrize("first", ["jsonl", "txt"])
def test_every_shard_is_checked_for_the_text_field(tmp_path, first):
    """A good first shard (records with `text`, or a .txt folder) does not hide a later one without it."""
    if first == "txt":
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "one.txt").write_text("a plain text document")
        good = tmp_path / "a"
    else:
        good = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "fine"}])
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": 2, "body": "no text field here"}])
    with pytest.raises(HermesError, match=r"b\.jsonl: no record has the text field 'text' \(fields found: id, body\)"):
        check_fields(discover([str(good), str(bad)]), Fields())
