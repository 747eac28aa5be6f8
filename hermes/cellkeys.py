"""Levels and cell keys: what a level is called, and how a cell's key is written in arrays, text
and SQL. Every module names levels and builds keys through here.

A document's code is (c1, c2, c3); its level-l cell is the prefix (c1, ..., cl). Level 1 is "L1"
(views `cells_l1`), level 2 "L12", level 3 "L123". In arrays a level-l key packs the prefix into
one int64, CODE_BITS bits per code; as text it is the codes joined by dots (`17.203`), a fixed
stage showing its class name instead of its code (`comp.203`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import numpy as np

LEVELS = (1, 2, 3)
N_CODES = len(LEVELS)   # a document's code has c1, c2, c3
CODES = tuple(f"c{i + 1}" for i in range(N_CODES))     # their column names
CODE_BITS = 15          # codes are SMALLINT (< 2^15); a level-l key packs the code prefix into an int64


def level_name(level: int) -> str:
    """"L1", "L12", "L123"."""
    return "L" + "123"[:level]


def view_suffix(level: int) -> str:
    """"l1", "l12", "l123": the store's `cells_<suffix>` view of the level."""
    return "l" + "123"[:level]


def codes_sql(level: int, alias: str = "") -> str:
    """The level's code columns in SQL, `c1, c2` (each after `alias`, e.g. "a."); empty at level 0."""
    return ", ".join(f"{alias}{c}" for c in CODES[:level])


def codes_match(level: int, a: str, b: str) -> str:
    """SQL that holds where tables `a` and `b` are in the same level-`level` cell."""
    return " AND ".join(f"{a}.{c} = {b}.{c}" for c in CODES[:level])


def codes_padded(level: int) -> str:
    """All code columns in SQL, those past the level as NULL (rows of every level in one table)."""
    return ", ".join(c if i < level else f"CAST(NULL AS SMALLINT) AS {c}" for i, c in enumerate(CODES))


def pack(codes: np.ndarray, level: int) -> np.ndarray:
    """An int64 key per row of `codes` (n, 3) for its level-`level` cell."""
    import numpy as np      # imported here: the command line names levels without loading numpy

    k = codes[:, 0].astype(np.int64)
    for s in range(1, level):
        k = (k << CODE_BITS) | codes[:, s].astype(np.int64)
    return k


def parent_keys(keys: np.ndarray, level: int, parent_level: int) -> np.ndarray:
    """The packed keys of the level-`parent_level` cells that hold these level-`level` cells."""
    return keys >> (CODE_BITS * (level - parent_level))


def key_text(keys: np.ndarray, level: int, names: dict[int, list[str]] | None = None) -> list[str]:
    """The text key of each packed level-`level` key (`17.203`; a named stage shows its class name)."""
    mask = (1 << CODE_BITS) - 1
    names = names or {}
    parts = [(keys >> (CODE_BITS * (level - 1 - s))) & mask for s in range(level)]
    text = [[names[s][int(v)] for v in p] if s in names else [str(int(v)) for v in p] for s, p in enumerate(parts)]
    return [".".join(t[i] for t in text) for i in range(len(keys))]


def key_sql(level: int, named: Iterable[int] = (), alias: str = "") -> tuple[str, str]:
    """SQL for the text key of a level's cell (`17.203.5`; a fixed stage's class name in place of
    its code, `comp.203.5`) over the code columns of table alias `alias`, and the joins it needs
    (on table stage_classes). `named` holds the 0-based indices of the stages with names."""
    named = set(named)
    parts, joins = [], []
    for i in range(level):
        col = f"{alias}.c{i + 1}" if alias else f"c{i + 1}"
        if i in named:
            parts.append(f"k{i + 1}.name")
            joins.append(f"LEFT JOIN stage_classes k{i + 1} ON k{i + 1}.stage = {i + 1} AND k{i + 1}.code = {col}")
        else:
            parts.append(f"CAST({col} AS VARCHAR)")
    return " || '.' || ".join(parts), " ".join(joins)
