"""Hints for a config problem: the likely intended name for a misspelt one ("did you mean"), and
what to write instead of a number with a unit ("3s", "64k") or in quotes."""

from __future__ import annotations

import difflib
import re
from typing import Any

# Unit hints: every `number()` key is a duration in seconds; these integer keys are bytes.
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SECONDS = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "ms": 0.001,
            "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60, "h": 3600, "hour": 3600,
            "hours": 3600, "d": 86400, "day": 86400, "days": 86400}
_SIZE_KEYS = frozenset({"max_header_bytes", "max_body"})
_BYTES = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _edits(a: str, b: str) -> int:
    """Typing mistakes between a and b: insertions, deletions, substitutions, transpositions."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            d = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                d = min(d, prev2[j - 2] + 1)
            row.append(d)
        prev2, prev = prev, row
    return prev[-1]


def closest(word: str, candidates: Any, cutoff: float = 0.6) -> str | None:
    """The candidate `word` is most likely a typo of (case aside), or None: similar by difflib
    and at most one mistake per three letters ("colour" is not a typo of "cluster")."""
    names = {str(c).lower(): str(c) for c in candidates}
    w = word.lower()
    for c in difflib.get_close_matches(w, list(names), n=3, cutoff=cutoff):
        if _edits(w, c) <= max(1, len(w) // 3):
            return names[c]
    return None


def did_you_mean(word: str, candidates: Any, cutoff: float = 0.6) -> str:
    """"; did you mean 'x'?" for the closest of `candidates` to `word`, or ""."""
    close = closest(word, candidates, cutoff)
    return f"; did you mean {close!r}?" if close is not None else ""


def unit_hint(key: str, value: object, kinds: tuple[type, ...]) -> str:
    """What to write instead of a number in quotes or with a unit ("3s", "1m", "64k")."""
    if not isinstance(value, str) or int not in kinds:
        return ""
    m = _DURATION_RE.fullmatch(value.strip().lower())
    if m is None:
        return ""
    n, unit = float(m.group(1)), m.group(2)
    if float in kinds and unit in _SECONDS:  # number(): seconds
        if not unit:
            return f": write it without quotes, {key} = {m.group(1)}"
        seconds = n * _SECONDS[unit]
        text = str(int(seconds)) if seconds == int(seconds) else f"{seconds:.6f}".rstrip("0")
        return f"; durations are numbers of seconds: write {key} = {text}"
    if key in _SIZE_KEYS and unit in _BYTES:
        return f"; sizes are numbers of bytes: write {key} = {int(n * _BYTES[unit])}"
    if not unit and float not in kinds and m.group(1).isdigit():
        return f": write it without quotes, {key} = {m.group(1)}"
    return ""


def table_header(path: str) -> str:
    """vs[0].tls -> [vs.tls]; vs[0].subvs[1] -> [[vs.subvs]] (how the table is written)."""
    bare = re.sub(r"\[\d+\]", "", path)
    return f"[[{bare}]]" if path.endswith("]") else f"[{bare}]"


__all__ = ["closest", "did_you_mean", "table_header", "unit_hint"]
