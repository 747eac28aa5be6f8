"""Reading corpora: discover shards, then stream each as Arrow batches of documents.

Every format goes through the same record check, so a bad record is rejected the same way
wherever it comes from. Nothing reads a whole file into memory.

A shard is one unit of work: a file, a folder of .txt files, or one split of a Hugging Face
dataset saved with `save_to_disk`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from hermes.aggregates import MAX_QUALITY
from hermes.errors import HermesError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = ("", ".gz", ".zst")
SUPPORTED = ("JSONL (.jsonl/.ndjson/.json, optionally .gz or .zst)", "Parquet (.parquet)",
             "CSV/TSV (.csv/.tsv)", "a folder of .txt files", "a Hugging Face dataset saved with save_to_disk")

DOC_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("line", pa.int64()),      # 1-based line (JSONL, CSV) or row number (Parquet, HF); NULL for .txt files
    ("quality", pa.float64()), # the quality field's value where Fields.quality is set, else NULL
])
REJECT_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("line", pa.int64()),
    ("doc_id", pa.string()),
    ("reason", pa.string()),
])


@dataclass(frozen=True)
class Fields:
    text: str = "text"
    id: str = "id"
    source: str = "source"
    quality: str | None = None     # a numeric field read as the quality score, if any


@dataclass(frozen=True)
class Shard:
    """One unit of reading and labeling work."""

    path: str       # the file, the .txt folder or the dataset folder
    name: str       # the name used in derived doc_ids and as default source (path relative to its input)
    fmt: str        # jsonl | parquet | csv | tsv | text | hf
    split: str | None = None   # the split of a DatasetDict
    # A part of a large file: byte range [start, end) of a plain JSONL file, whose first line is
    # line `first` of the file; or row groups [start, end) of a Parquet file, whose first row is
    # row `first`. None: the whole file.
    start: int | None = None
    end: int | None = None
    first: int = 1

    @property
    def key(self) -> str:
        """A stable, file-system-safe name for this shard's outputs."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)[-60:].strip("._") or "shard"
        part = "" if self.start is None else f"\0{self.start}-{self.end}"
        digest = hashlib.sha1(f"{self.fmt}\0{os.path.abspath(self.path)}\0{self.split}{part}".encode()).hexdigest()[:10]
        return f"{stem}-{digest}" if self.start is None else f"{stem}.part{self.start}-{digest}"

    def stat(self) -> dict[str, Any]:
        """What identifies this shard's content cheaply: size and mtime of its file(s)."""
        p = Path(self.path)
        if p.is_file():
            st = p.stat()
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        total, latest = 0, 0
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                total += st.st_size
                latest = max(latest, st.st_mtime_ns)
        return {"size": total, "mtime_ns": latest}


@dataclass
class Reject:
    file: str
    line: int | None
    doc_id: str | None
    reason: str


# --------------------------------------------------------------------------- discovery

def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for comp in COMPRESSIONS:
        for suf in JSONL_SUFFIXES:
            if name.endswith(suf + comp):
                return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".txt"):
        return "text"
    return None


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
        or (path / "state.json").is_file()


def _shards_in_folder(root: Path, shown: str) -> list[Shard]:
    if _is_hf_dataset(root):
        return _hf_shards(root, shown)
    shards: list[Shard] = []
    text_dirs: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if d != root and _is_hf_dataset(d):
            shards.extend(_hf_shards(d, os.path.join(shown, os.path.relpath(d, root))))
            dirnames[:] = []
            continue
        for fn in sorted(filenames):
            f = d / fn
            fmt = _format_of(f)
            if fmt == "text":
                text_dirs.add(d)
            elif fmt is not None:
                shards.append(Shard(str(f), os.path.join(shown, os.path.relpath(f, root)), fmt))
    for d in sorted(text_dirs):
        rel = os.path.relpath(d, root)
        shards.append(Shard(str(d), shown if rel == "." else os.path.join(shown, rel), "text"))
    return sorted(shards, key=lambda s: s.name)


def _hf_shards(root: Path, shown: str) -> list[Shard]:
    dd = root / "dataset_dict.json"
    if dd.is_file():
        splits = json.loads(dd.read_text()).get("splits", [])
        return [Shard(str(root), f"{shown}/{s}", "hf", split=s) for s in splits]
    return [Shard(str(root), shown, "hf")]


def split_large(shard: Shard, max_bytes: int, max_rows: int) -> list[Shard]:
    """Row ranges of a large file as shards of their own: byte ranges at line ends of a plain
    (uncompressed) JSONL file over `max_bytes`, row-group ranges of a Parquet file over `max_rows`
    rows. Other files stay whole (a compressed stream cannot be entered in the middle)."""
    if shard.fmt == "jsonl" and not shard.path.lower().endswith((".gz", ".zst")):
        size = os.path.getsize(shard.path)
        if size <= max_bytes:
            return [shard]
        parts, start, line = [], 0, 1
        with open(shard.path, "rb") as f:
            while start < size:
                f.seek(min(start + max_bytes, size))
                if f.tell() < size:
                    f.readline()                       # move the cut to the end of a line
                end = f.tell()
                parts.append(Shard(shard.path, shard.name, shard.fmt, None, start, end, line))
                f.seek(start)                          # count the lines of this part for the next one
                remaining = end - start
                while remaining > 0:
                    block = f.read(min(1 << 24, remaining))
                    line += block.count(b"\n")
                    remaining -= len(block)
                start = end
        return parts
    if shard.fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(shard.path).metadata
        except Exception:
            return [shard]                             # the reader reports it properly
        if meta.num_rows <= max_rows or meta.num_row_groups < 2:
            return [shard]
        parts, first, group_start, rows = [], 1, 0, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            if rows >= max_rows or g == meta.num_row_groups - 1:
                parts.append(Shard(shard.path, shard.name, shard.fmt, None, group_start, g + 1, first))
                first += rows
                group_start, rows = g + 1, 0
        return parts
    return [shard]


def discover(inputs: Iterable[str | os.PathLike], max_bytes: int | None = None,
             max_rows: int | None = None) -> list[Shard]:
    """Expand files, folders and globs into an ordered list of shards; with max_bytes/max_rows,
    large files are cut into row ranges (see split_large)."""
    shards: list[Shard] = []
    for raw in inputs:
        item = str(raw)
        p = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise HermesError(f"{item}: the pattern matches no file", hint="check the glob and quote it")
            base = Path(_glob_base(item))
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    shards.extend(_shards_in_folder(mp, os.path.relpath(mp, base)))
                elif _format_of(mp) is not None:
                    shards.append(_file_shard(mp, os.path.relpath(mp, base)))
            continue
        if not p.exists():
            raise HermesError(f"{item}: no such file or folder", hint="check the path")
        if p.is_dir():
            found = _shards_in_folder(p, p.resolve().name or str(p.resolve()))
            if not found:
                raise HermesError(f"{item}: the folder holds no readable corpus file",
                                  hint="supported: " + "; ".join(SUPPORTED))
            shards.extend(found)
        else:
            shards.append(_file_shard(p, p.name))
    seen: set[tuple[str, str | None]] = set()
    unique = []
    for s in shards:
        if (os.path.abspath(s.path), s.split) not in seen:
            seen.add((os.path.abspath(s.path), s.split))
            unique.append(s)
    names = [s.name for s in unique]
    if len(set(names)) != len(names):   # same relative name from two inputs: fall back to full paths
        unique = [Shard(s.path, s.path if s.split is None else f"{s.path}/{s.split}", s.fmt, s.split)
                  for s in unique]
    if max_bytes or max_rows:
        unique = [part for s in unique for part in split_large(s, max_bytes or 1 << 62, max_rows or 1 << 62)]
    return unique


def _glob_base(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _file_shard(p: Path, name: str) -> Shard:
    fmt = _format_of(p)
    if fmt is None:
        raise HermesError(f"{p}: unknown corpus format", hint="supported: " + "; ".join(SUPPORTED))
    if fmt == "text":
        raise HermesError(f"{p}: a single .txt file is not a corpus; pass the folder that holds the .txt files",
                          hint="each .txt file in a folder is one document")
    return Shard(str(p), name, fmt)


# --------------------------------------------------------------------------- records

def get_path(record: dict, dotted: str) -> tuple[bool, Any]:
    """Follow a dotted path into nested mappings. Returns (found, value)."""
    if dotted in record:
        return True, record[dotted]
    cur: Any = record
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return False, None
    return True, cur


def field_names(record: dict, prefix: str = "", depth: int = 3) -> list[str]:
    names = []
    for k, v in record.items():
        name = f"{prefix}{k}"
        names.append(name)
        if isinstance(v, dict) and depth > 1:
            names.extend(field_names(v, name + ".", depth - 1))
    return names


def _open_text_stream(path: str) -> io.BufferedIOBase:
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


# Each raw item is (line, record-or-None, reject-reason-or-None).
RawItem = tuple[int | None, Any, str | None]


def _raw_jsonl(shard: Shard, from_line: int = 0) -> Iterator[RawItem]:
    """The lines of a JSONL shard as raw items (those before line `from_line` skipped unread)."""
    with _open_text_stream(shard.path) as f:
        n = shard.first - 1
        if shard.start is not None:
            f.seek(shard.start)
        while True:
            if shard.end is not None and f.tell() >= shard.end:
                break
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:   # truncated or corrupt compressed stream
                raise HermesError(f"{shard.path}:{n + 1}: cannot decompress ({e})",
                                  hint="the file is truncated or corrupt; re-create it") from None
            if not raw:
                break
            n += 1
            if n >= from_line and raw.strip():     # blank lines are layout, not records
                yield _jsonl_item(n, raw)


def _jsonl_item(n: int, raw: bytes) -> RawItem:
    """Line `n` of a JSONL file (not blank) as a raw item."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return n, None, f"invalid UTF-8 at byte {e.start}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return n, None, f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}"
    except RecursionError:
        return n, None, "invalid JSON: nested too deeply"
    except ValueError as e:         # an integer of more digits than Python converts
        return n, None, f"invalid JSON: {str(e).splitlines()[0]}"
    if not isinstance(rec, dict):
        return n, None, f"record is a JSON {type(rec).__name__}, not an object"
    return n, rec, None


def _raw_csv(shard: Shard) -> Iterator[RawItem]:
    delimiter = "\t" if shard.fmt == "tsv" else ","
    csv.field_size_limit(1 << 30)
    with open(shard.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for rec in reader:
                line = reader.line_num
                if None in rec:
                    yield line, None, f"row has {len(reader.fieldnames or []) + len(rec[None])} fields, " \
                                      f"the header {len(reader.fieldnames or [])}"
                    continue
                bad = [k for k, v in rec.items() if isinstance(v, str) and _has_surrogates(v)]
                if bad:
                    yield line, None, f"invalid UTF-8 in field '{bad[0]}'"
                    continue
                yield line, rec, None
        except csv.Error as e:
            raise HermesError(f"{shard.path}:{reader.line_num}: not readable as {shard.fmt.upper()} ({e})",
                              hint="check the quoting of that line") from None


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _raw_parquet(shard: Shard, batch_size: int) -> Iterator[RawItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard.path)
    except Exception as e:   # pyarrow raises several types for a file that is not Parquet
        raise HermesError(f"{shard.path}: not a readable Parquet file ({e})",
                          hint="check that the file is complete and really Parquet") from None
    row = shard.first - 1
    groups = None if shard.start is None else list(range(shard.start, shard.end))
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec, None


def _raw_hf(shard: Shard, batch_size: int) -> Iterator[RawItem]:
    try:
        import datasets
    except ImportError:
        raise HermesError(f"{shard.path}: reading a Hugging Face dataset needs the datasets package",
                          hint="pip install datasets") from None
    try:
        ds = datasets.load_from_disk(shard.path)
    except Exception as e:
        raise HermesError(f"{shard.path}: not a readable Hugging Face dataset ({e})",
                          hint="the folder must come from Dataset.save_to_disk") from None
    if shard.split is not None:
        ds = ds[shard.split]
    row = 0
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for i in range(len(batch[cols[0]]) if cols else 0):
            row += 1
            yield row, {c: batch[c][i] for c in cols}, None


def _raw_text(shard: Shard) -> Iterator[RawItem]:
    root = Path(shard.path)
    for f in sorted(root.glob("*.txt")):
        data = f.read_bytes()
        rel = os.path.join(shard.name, f.name)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield None, {"__id": rel}, f"invalid UTF-8 at byte {e.start}"
            continue
        yield None, {"__id": rel, "__text": text}, None


def raw_records(shard: Shard, batch_size: int = 2048) -> Iterator[RawItem]:
    if shard.fmt == "jsonl":
        return _raw_jsonl(shard)
    if shard.fmt in ("csv", "tsv"):
        return _raw_csv(shard)
    if shard.fmt == "parquet":
        return _raw_parquet(shard, batch_size)
    if shard.fmt == "hf":
        return _raw_hf(shard, batch_size)
    if shard.fmt == "text":
        return _raw_text(shard)
    raise HermesError(f"{shard.path}: unknown format {shard.fmt!r}")


def _as_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (str, int)):
        s = str(value)
        return s if s.strip() else None
    return None


def derived_doc_id(shard: Shard, line: int) -> str:
    """The doc_id of a record that has none: its shard's name and line (or row)."""
    return f"{shard.name}:{line}"


def iter_records(shard: Shard, fields: Fields = Fields()) -> Iterator[tuple[str, dict]]:
    """(doc_id, record) for every well-formed record of a shard, with read_shard's doc_ids.
    For reading fields that labeling does not keep (gold labels, metadata)."""
    for line, rec, problem in raw_records(shard):
        if rec is None or problem is not None:
            continue
        if "__id" in rec:
            yield rec["__id"], {"text": rec.get("__text")}
            continue
        has_id, raw_id = get_path(rec, fields.id)
        doc_id = _as_id(raw_id) if has_id else None
        if doc_id is None and line is not None:
            doc_id = derived_doc_id(shard, line)
        if doc_id is not None:
            yield doc_id, rec


def _quality_value(rec: dict, name: str) -> tuple[float | None, str | None]:
    found, value = get_path(rec, name)
    if not found or value is None:
        return None, f"missing quality field '{name}'"
    if isinstance(value, str):
        try:
            value = float(value)          # CSV cells are strings
        except ValueError:
            return None, f"quality field '{name}' is not a number ({value[:20]!r})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"quality field '{name}' is {type(value).__name__}, not a number"
    if value != value or value in (float("inf"), float("-inf")):
        return None, f"quality field '{name}' is not a finite number"
    if abs(value) >= MAX_QUALITY:     # the store sums qualities exactly, as decimals
        return None, f"quality field '{name}' is out of range ({value:.3g}; at most {MAX_QUALITY:.0e} in size)"
    return float(value), None


def read_shard(shard: Shard, fields: Fields = Fields(), batch_size: int = 2048
               ) -> Iterator[tuple[pa.Table, list[Reject]]]:
    """Stream a shard as (documents, rejects) pairs; documents follow DOC_SCHEMA, in input order.
    A batch holds `batch_size` documents (the last fewer), or fewer with `batch_size` rejects."""
    if _block_readable(shard, fields):
        yield from _rebatched(_jsonl_blocks(shard, fields), batch_size)
        return
    yield from _rebatched(_record_blocks(shard, raw_records(shard, batch_size), fields, batch_size), batch_size)


def _record_blocks(shard: Shard, items: Iterable[RawItem], fields: Fields, size: int
                   ) -> Iterator[tuple[pa.Table, list[Reject]]]:
    """Raw items checked one by one (documents and rejects), in blocks of up to `size` of either."""
    docs: dict[str, list] = {k: [] for k in DOC_SCHEMA.names}
    rejects: list[Reject] = []
    for item in items:
        doc = _checked(shard, fields, *item)
        if isinstance(doc, Reject):
            rejects.append(doc)
        else:
            for name, value in zip(DOC_SCHEMA.names, doc):
                docs[name].append(value)
        if len(docs["doc_id"]) >= size or len(rejects) >= size:
            yield pa.table(docs, schema=DOC_SCHEMA), rejects
            docs, rejects = {k: [] for k in DOC_SCHEMA.names}, []
    if docs["doc_id"] or rejects:
        yield pa.table(docs, schema=DOC_SCHEMA), rejects


def _checked(shard: Shard, fields: Fields, line: int | None, rec: Any, problem: str | None) -> tuple | Reject:
    """The record check every format goes through: a document (doc_id, text, source, line,
    quality) or a Reject with its reason."""
    if rec is not None and "__id" in rec:          # a .txt file: the file is the record
        doc_id, text, source, found = rec["__id"], rec.get("__text"), shard.name, True
        quality = None
        if fields.quality is not None and problem is None:
            problem = f"missing quality field '{fields.quality}' (a .txt file has no fields)"
    else:
        doc_id, source = None, shard.name
        text, found = None, False
        if rec is not None:
            has_id, raw_id = get_path(rec, fields.id)
            doc_id = _as_id(raw_id) if has_id else None
            if has_id and raw_id is not None and doc_id is None:
                problem = f"id field '{fields.id}' is not a string or integer"
            has_src, raw_src = get_path(rec, fields.source)
            if has_src and raw_src is not None:
                source = str(raw_src)
            found, text = get_path(rec, fields.text)
        quality = None
        if rec is not None and fields.quality is not None and problem is None:
            quality, problem = _quality_value(rec, fields.quality)
        if doc_id is None and line is not None:
            doc_id = derived_doc_id(shard, line)
    if problem is None:
        if not found:
            problem = f"missing text field '{fields.text}'"
        elif not isinstance(text, str):
            problem = f"text field '{fields.text}' is {type(text).__name__}, not a string"
        elif not text.strip():
            problem = f"empty text field '{fields.text}'"
        elif _has_surrogates(text):
            problem = f"invalid UTF-8 in text field '{fields.text}'"
    if problem is not None:
        return Reject(shard.name, line, doc_id, problem)
    return doc_id, text, source, line, quality


def _rebatched(blocks: Iterable[tuple[pa.Table, list[Reject]]], size: int) -> Iterator[tuple[pa.Table, list[Reject]]]:
    """Blocks of documents and rejects as batches of `size` documents (each one Arrow chunk), or
    fewer where `size` rejects have gathered; every reject goes out with or before the documents
    that follow it."""
    pending: list[pa.Table] = []
    held, rejects = 0, []
    for table, bad in blocks:
        pending.append(table)
        held += table.num_rows
        rejects += bad
        if held < size and len(rejects) < size:
            continue
        docs = pa.concat_tables(pending)
        while docs.num_rows >= size or len(rejects) >= size:
            take = min(size, docs.num_rows)
            yield docs.slice(0, take).combine_chunks(), rejects
            docs, rejects = docs.slice(take), []
        pending, held = [docs], docs.num_rows
    if held or rejects:
        yield pa.concat_tables(pending).combine_chunks(), rejects


# --------------------------------------------------------------------------- JSONL, by blocks
# A plain JSONL corpus is parsed by Arrow's JSON reader, a block of lines at a time, without the
# GIL and without a Python object per record. A block is taken only where Arrow's reading is the
# line reader's: valid UTF-8, one JSON object on each of its lines, no blank line, no byte-order
# mark, the text a non-blank string, the id a string or an integer (or absent). One difference is
# left: a record that is valid JSON but beyond what Python's json takes (an integer of over 4,300
# digits, or nesting about 1,000 deep, in any field) is rejected line by line and kept by Arrow,
# which reads only the three fields, when the rest of its block is clean. Any other block (a
# malformed record, an odd value) goes through the line reader, which rejects what it must with
# its reason; so both give the same documents and rejects.

JSONL_BLOCK = 8 << 20       # bytes of lines per block
# What str.strip() removes (str.isspace()): a text of these alone is empty.
PY_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006" \
                "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_NOT_BLANK = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]"


def _block_readable(shard: Shard, fields: Fields) -> bool:
    """Whether a shard can be read by blocks: JSONL, and fields at the top level of the record
    (a dotted path or a quality field goes through the line reader)."""
    names = [fields.text, fields.id, fields.source]
    return (shard.fmt == "jsonl" and fields.quality is None and len(set(names)) == 3
            and not any("." in name for name in names))


def _jsonl_blocks(shard: Shard, fields: Fields) -> Iterator[tuple[pa.Table, list[Reject]]]:
    """A JSONL shard (or its byte range) as (documents, rejects), a block of whole lines at a time."""
    line, pending = shard.first, []           # pending: the start of a line not ended yet
    id_types = [pa.string(), pa.int64()]      # the one that read the last block first
    with _open_text_stream(shard.path) as f:
        if shard.start is not None:
            f.seek(shard.start)
        left = None if shard.end is None else shard.end - (shard.start or 0)
        while True:
            try:
                chunk = f.read(JSONL_BLOCK if left is None else min(JSONL_BLOCK, left))
            except (OSError, EOFError):      # a broken stream: the line reader says at which line
                yield from _record_blocks(shard, _raw_jsonl(shard, from_line=line), fields, 4096)
                return
            if left is not None:
                left -= len(chunk)
            cut = chunk.rfind(b"\n") + 1 if chunk else len(chunk)
            if chunk and not cut:
                pending.append(chunk)
                continue
            block, pending = b"".join(pending + [chunk[:cut]]), [chunk[cut:]]
            if block:
                n_lines = block.count(b"\n") + (not block.endswith(b"\n"))
                yield _jsonl_block(shard, fields, block, line, n_lines, id_types)
                line += n_lines
            if not chunk:
                return


def _jsonl_block(shard: Shard, fields: Fields, block: bytes, first: int, n_lines: int, id_types: list
                 ) -> tuple[pa.Table, list[Reject]]:
    """`n_lines` whole lines of a JSONL file, the first being line `first`: by Arrow, or line by line."""
    docs = _arrow_block(shard, fields, block, first, n_lines, id_types)
    if docs is not None:
        return docs, []
    lines = block.split(b"\n")
    last = lines.pop()                       # after the last break: empty, or a last line with none
    lines = [raw + b"\n" for raw in lines] + ([last] if last else [])    # each as readline gives it
    items = (_jsonl_item(first + i, raw) for i, raw in enumerate(lines) if raw.strip())
    tables, rejects = [DOC_SCHEMA.empty_table()], []
    for table, bad in _record_blocks(shard, items, fields, 1 << 30):
        tables.append(table)
        rejects += bad
    return pa.concat_tables(tables), rejects


# Between two lines, each one JSON object: the end of one and the start of the next. A line break
# anywhere else (inside a record spread over lines, or around a blank line, which Arrow skips and
# the line reader counts) sends the block to the line reader; in JSON, "}" then "{" only ever
# separates two top-level values. A block of one blank line reads as no rows, one too few.
_LINE_BREAK_BETWEEN_RECORDS = re.compile(rb"\}[ \t\r]*\n[ \t\r]*\{")
def _valid_utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 (Arrow's validation of one string)."""
    one = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(np.array([0, len(data)], dtype=np.int64)),
                                                       pa.py_buffer(data)])
    try:
        one.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def _arrow_block(shard: Shard, fields: Fields, block: bytes, first: int, n_lines: int, id_types: list
                 ) -> pa.Table | None:
    """The block's documents (its `n_lines` lines) as Arrow reads them, or None where that would not
    be what the line reader gives (see above). `id_types`: the id's Arrow types to try, in order
    (the one that reads is moved first)."""
    import pyarrow.compute as pc
    import pyarrow.json as pj

    body = block[:-1] if block.endswith(b"\n") else block
    if (len(_LINE_BREAK_BETWEEN_RECORDS.findall(body)) != n_lines - 1 or b"\xef\xbb\xbf" in block
            or not _valid_utf8(block)):      # Arrow passes invalid UTF-8 through
        return None
    table = None
    for id_type in list(id_types):
        schema = pa.schema([(fields.text, pa.string()), (fields.id, id_type), (fields.source, pa.string())])
        parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            try:
                table = pj.read_json(pa.BufferReader(block), read_options=pj.ReadOptions(block_size=max(1 << 20, len(block) // 4)),
                                     parse_options=parse)
            except pa.ArrowInvalid as e:
                if "straddl" not in str(e):
                    raise
                # a line longer than Arrow's parsing block: the whole block as one
                table = pj.read_json(pa.BufferReader(block), read_options=pj.ReadOptions(block_size=len(block) + 1),
                                     parse_options=parse)
            id_types.remove(id_type)
            id_types.insert(0, id_type)
            break
        except ValueError:      # ArrowInvalid; a message that is not UTF-8 itself
            continue
    if table is None or table.num_rows != n_lines:
        return None
    text, ids, source = (table.column(name).combine_chunks() for name in (fields.text, fields.id, fields.source))
    if text.null_count or not pc.all(pc.match_substring_regex(text, _NOT_BLANK)).as_py():
        return None
    if ids.type != pa.string():
        ids = ids.cast(pa.string())
    elif len(ids) - ids.null_count and not pc.all(pc.match_substring_regex(ids.drop_null(), _NOT_BLANK)).as_py():
        return None         # a blank id is refused by the line reader
    line = pa.array(np.arange(first, first + n_lines, dtype=np.int64))
    if ids.null_count:      # no id: the derived one, shard name and line
        ids = pc.coalesce(ids, pc.binary_join_element_wise(shard.name, line.cast(pa.string()), ":"))
    if source.null_count:
        source = pc.coalesce(source, pa.scalar(shard.name))
    return pa.table([ids, text, source, line, pa.nulls(n_lines, pa.float64())], schema=DOC_SCHEMA)


def check_fields(shards: list[Shard], fields: Fields, probe: int = 1000) -> None:
    """Fail early, before anything is written, when a shard's first records have no text field
    (each shard is read only until a record has it)."""
    for shard in shards:
        if shard.fmt == "text":
            continue
        seen: dict[str, int] = {}       # field -> total characters of its string values
        n = 0
        found = False
        for _, rec, _ in raw_records(shard):
            if rec is None:
                continue
            n += 1
            if get_path(rec, fields.text)[0]:
                found = True
                break
            for name in field_names(rec):
                value = get_path(rec, name)[1]
                seen[name] = seen.get(name, 0) + (len(value) if isinstance(value, str) else 0)
            if n >= probe:
                break
        if n and not found:
            longest = max(seen, key=seen.get) if seen and max(seen.values()) > 0 else None
            raise HermesError(
                f"{shard.path}: no record has the text field '{fields.text}' "
                f"(fields found: {', '.join(list(seen)[:30]) or 'none'})",
                hint="name the field holding the text with --text-field"
                     + (f", e.g. --text-field {longest}" if longest else ""))
    # every shard empty or fully malformed: the labeling pass reports it


def lookup(inputs: list[str], fields: Fields, wanted: set[str], extra: list[str] = ()) -> dict[str, dict[str, Any]]:
    """For each wanted doc_id found in the corpus, its text and the values of the `extra` dotted
    fields (None where a record lacks one); the first record of a doc_id wins, as in the store."""
    out: dict[str, dict[str, Any]] = {}
    for shard in discover(inputs):
        for doc_id, rec in iter_records(shard, fields):
            if doc_id in wanted and doc_id not in out:
                values = {"text": get_path(rec, fields.text)[1]}
                for name in extra:
                    found, value = get_path(rec, name)
                    values[name] = value if found else None
                out[doc_id] = values
                if len(out) == len(wanted):
                    return out
    return out
