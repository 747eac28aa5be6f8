"""Progress on stderr: documents, documents/s, shards, ETA. Quiet mode prints nothing."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, total_shards: int = 0, quiet: bool = False, every: float | None = None):
        self.what = what
        self.total_shards = total_shards
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 10.0)
        self.docs = 0
        self.shards = 0
        self.start = time.perf_counter()
        self._last = self.start
        self._shown: tuple[int, int] | None = None
        self._rate_docs = 0          # docs processed in this session (not skipped), for the rate

    def advance(self, docs: int, counted: bool = True) -> None:
        self.docs += docs
        if counted:
            self._rate_docs += docs
        self._show()

    def shard_done(self) -> None:
        self.shards += 1
        self._show()

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.start
        return self._rate_docs / dt if dt > 0 else 0.0

    def _line(self) -> str:
        parts = [f"{self.what}: {self.docs:,} docs", f"{self.rate:,.1f} docs/s"]
        if self.total_shards:
            parts.append(f"shards {self.shards}/{self.total_shards}")
            if 0 < self.shards < self.total_shards:
                elapsed = time.perf_counter() - self.start
                eta = elapsed / self.shards * (self.total_shards - self.shards)
                parts.append(f"ETA {eta:,.0f}s")
        return "  ".join(parts)

    def _show(self, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self._shown = (self.docs, self.shards)
        if self.tty:
            sys.stderr.write("\r\033[K" + self._line())
        else:
            sys.stderr.write(self._line() + "\n")
        sys.stderr.flush()

    def note(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.quiet:
            return
        if self.tty or self._shown != (self.docs, self.shards):
            self._show(force=True)
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
