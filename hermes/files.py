"""Writing outputs so that a reader never sees half of one: write beside, then rename over.

Every file or folder hermes writes goes through `replacing` (or the one-call helpers below): the
content is written under `<name>.tmp` next to its final path and renamed over it only when
complete. If the writing fails, the temporaries are removed and what was there before stays.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NO_ROOM_WORDS = ("No space left on device", "File too large", "Disk quota exceeded")


def out_of_room(exc: BaseException) -> bool:
    """True for a write that found no room: a full disk, a quota, a file-size limit (an OSError's
    errno, or the system's words in another library's message: DuckDB's, pyarrow's, shutil's)."""
    if isinstance(exc, OSError) and exc.errno in NO_ROOM:
        return True
    return any(w in str(exc) for w in _NO_ROOM_WORDS)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def remove(path: Path) -> None:
    """A file or a folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Staged(list):
    """The temporary paths of a `replacing` block, in the order of its paths."""

    discarded = False

    def discard(self) -> None:
        """Leave the final paths as they are (the block decided not to replace them)."""
        self.discarded = True


@contextmanager
def replacing(*paths: str | Path) -> Iterator[Staged]:
    """Yield a temporary path beside each of `paths` (files or folders; parents are created). When
    the block ends normally, each temporary replaces its path, in the order given (so the last one
    can serve as the marker that the others are complete); when it raises, or calls `discard()`,
    the temporaries are removed and the paths stay as they were."""
    finals = [Path(p) for p in paths]
    staged = Staged(tmp_path(p) for p in finals)
    for final, tmp in zip(finals, staged):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)                      # left by a run that was killed
    try:
        yield staged
    except BaseException:
        for tmp in staged:
            remove(tmp)
        raise
    if staged.discarded:
        for tmp in staged:
            remove(tmp)
        return
    for final, tmp in zip(finals, staged):
        if tmp.is_dir() and final.exists():
            remove(final)                # a folder cannot be renamed over a non-empty one
        os.replace(tmp, final)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_parquet(path: str | Path, table) -> None:
    import pyarrow.parquet as pq

    with replacing(path) as (tmp,):
        pq.write_table(table, tmp)


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
