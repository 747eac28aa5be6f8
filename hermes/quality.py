"""Quality scores: one per document, in the `quality` column.

Sources (config key `quality`):
- `none`: quality stays NULL.
- `heuristic`: a built-in score in [0, 1] from C4/Gopher-style signals (below). Cheap: no model.
- `field`: a numeric field of each record (`quality_field`, a dotted path); a record whose field is
  missing or not a number is rejected with the reason.

The heuristic is the mean of eight graded signals, each in [0, 1], so that scores rarely tie
and within-cell quantiles are meaningful:

| signal | 1.0 when | falls to 0.0 |
|---|---|---|
| length | >= 1,000 words (log scale) | 1 word |
| mean word length | 3 to 10 characters | 3 characters further out |
| symbols (#, ..., bullets) per word | 0 | 0.2 and above |
| words with a letter | >= 80% of words | 50% |
| stop-word density (the, of, and, ...) | >= 20% of words | 0% |
| letters among characters | >= 75% | 40% |
| repeated lines | 0% of lines | 30% and above |
| lines ending in an ellipsis | 0% of lines | 30% and above |
"""

from __future__ import annotations

import math
import re

import numpy as np

SOURCES = ("none", "heuristic", "field")

STOP_WORDS = frozenset("""the be to of and a in that have i it for not on with he as you do at this but his by
from they we say her she or an will my one all would there their what so up out if about who get which go me
is are was were been has had its our your them these those than then""".split())
_WORD = re.compile(r"\S+")
_SYMBOL = re.compile(r"#|\.\.\.|…|•")


def _clip(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def heuristic_score(text: str) -> float:
    words = _WORD.findall(text)
    n = len(words)
    if n == 0:
        return 0.0
    mean_len = sum(len(w) for w in words) / n
    s_len = _clip(math.log(n) / math.log(1000))
    s_wlen = 1.0 if 3 <= mean_len <= 10 else _clip(1 - min(abs(mean_len - 3), abs(mean_len - 10)) / 3)
    s_sym = _clip(1 - len(_SYMBOL.findall(text)) / n / 0.2)
    alpha_words = sum(1 for w in words if any(c.isalpha() for c in w)) / n
    s_alpha_words = _clip((alpha_words - 0.5) / 0.3)
    stop = sum(1 for w in words if w.lower().strip(".,;:!?\"'()") in STOP_WORDS) / n
    s_stop = _clip(stop / 0.2)
    chars = [c for c in text if not c.isspace()]
    letters = sum(1 for c in chars if c.isalpha()) / max(1, len(chars))
    s_letters = _clip((letters - 0.4) / 0.35)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    n_lines = max(1, len(lines))
    s_dup = _clip(1 - (len(lines) - len(set(lines))) / n_lines / 0.3)
    s_ellipsis = _clip(1 - sum(1 for ln in lines if ln.endswith(("...", "…"))) / n_lines / 0.3)
    return (s_len + s_wlen + s_sym + s_alpha_words + s_stop + s_letters + s_dup + s_ellipsis) / 8


def heuristic_scores(texts: list[str]) -> np.ndarray:
    return np.fromiter((heuristic_score(t) for t in texts), dtype=np.float64, count=len(texts))
