"""Longest-prefix lookup over a fixed set of strings, at a cost that barely grows with their number.

Many keys become one regex shaped like a trie (`/(?:api(?:/v1|/v2|)|static/)`), so `re` walks
the subject once in C and stops at the longest key; the matched text then indexes a dict. A handful
of keys is cheaper to try one by one with `str.startswith`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from ..runtime import pace, paced_calls

logger = logging.getLogger(__name__)

V = TypeVar("V")

# From this length on, a regex is compiled paced (see compile_big).
BIG_PATTERN = 2000
# Up to this many keys, startswith over each key (longest first) beats the ~200 ns fixed cost of
# one re.match call (measured on the 2-core bench machine, bench/rules_bench.py).
SMALL = 4

_Node = dict[str, "_Node"]
_END = ""  # marks "a key ends here" in the trie dicts; children are keyed by one character


def trie_regex(keys: Iterable[str]) -> str:
    """A regex matching, at the start of a subject, the longest of `keys` that the subject starts
    with: at each trie node the children are tried first and `|` (empty) last, so backtracking
    stops at the deepest key on the subject's path."""
    root: _Node = {}
    for key in keys:
        pace()
        node = root
        for ch in key:
            node = node.setdefault(ch, {})
        node[_END] = {}

    def emit(node: _Node) -> str:
        pace()  # thousands of keys take milliseconds (see compile_big)
        alts = []
        for ch in sorted(c for c in node if c != _END):
            sub = node[ch]
            lit = ch
            while _END not in sub and len(sub) == 1:  # collapse chains into one literal
                (nxt,) = sub
                lit += nxt
                sub = sub[nxt]
            alts.append(re.escape(lit) + emit(sub))
        if not alts:
            return ""
        if _END in node:
            return "(?:" + "|".join(alts) + "|)"  # `|)` not `)?`: BRANCH is cheaper than REPEAT
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(root)


def compile_big(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """`re.compile`, paced when the pattern is big (runtime.paced_calls: `re` parses a trie of
    thousands of keys in Python for tens of milliseconds, holding the GIL a serving loop waits
    for while rules compile off it)."""
    if len(pattern) < BIG_PATTERN:
        return re.compile(pattern, flags)
    with paced_calls():
        return re.compile(pattern, flags)


def trie_match(keys: Iterable[str]) -> Callable[[str], re.Match[str] | None] | None:
    """`match` of the compiled trie regex of `keys` (m.group() is the longest key the subject
    starts with), or None when `re` cannot compile it (pathological nesting)."""
    keys = list(keys)
    try:
        return compile_big(trie_regex(keys)).match
    except (RecursionError, re.error, OverflowError):
        logger.warning("prefix set of %d keys too deep for one regex; using a slower lookup",
                       len(keys))
        return None


def prefix_lookup(table: Mapping[str, V], missing: V) -> Callable[[str], V]:
    """A function returning table[k] for the longest key k that its argument starts with, or
    `missing` when none does."""
    frozen = dict(table)
    if len(frozen) <= SMALL:
        pairs = tuple(sorted(frozen.items(), key=lambda kv: -len(kv[0])))

        def small(subject: str) -> V:
            for key, value in pairs:
                if subject.startswith(key):
                    return value
            return missing

        return small
    match = trie_match(frozen)
    if match is None:
        return _by_length(frozen, missing)

    def trie(subject: str) -> V:
        m = match(subject)
        return missing if m is None else frozen[m.group()]

    return trie


def _by_length(table: dict[str, V], missing: V) -> Callable[[str], V]:
    lengths = tuple(sorted({len(k) for k in table}, reverse=True))

    def by_length(subject: str) -> V:
        for n in lengths:
            if len(subject) >= n and subject[:n] in table:
                return table[subject[:n]]
        return missing

    return by_length
