r"""What a content rule's regex promises about its subject: literal text it starts or ends with.

The router uses this to avoid running regexes: a regex that is nothing but anchored literal text
(`^/api`, `\.png$`, `^www\.example\.com$`) becomes a plain prefix, suffix or exact lookup, and
any other regex anchored on literal text (`^/api/v\d+/`, `^example\.com(:\d+)?/<token>$`) is
only run when a request's subject carries that literal. The analysis reads the parse tree of the
`re` module (`re._parser`, CPython's own parser, so it agrees with what `re` will match); when that
is unavailable or the pattern is anything unusual, the answer is `FREE` (always run the regex),
which is slower but never wrong.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..runtime import pace

logger = logging.getLogger(__name__)


class Shape(Enum):
    EXACT = "exact"            # the subject equals the literal (pure: no regex needed)
    PREFIX = "prefix"          # the subject starts with the literal (pure)
    SUFFIX = "suffix"          # the subject ends with the literal (pure)
    HAS_PREFIX = "has-prefix"  # the regex can only match if the subject starts with the literal
    HAS_SUFFIX = "has-suffix"  # the regex can only match if the subject ends with the literal
    FREE = "free"              # no anchored literal: run the regex (if `literal` is in the subject)


@dataclass(frozen=True, slots=True)
class RegexShape:
    shape: Shape
    # The literal (lowercased when `folded`); for FREE, text the subject must contain somewhere
    # ("" when there is none to go by).
    literal: str = ""
    # The regex ignores case: compare the lowercased subject with `literal`. Only exact for ASCII
    # subjects (re's case folding knows pairs like "s"/"\u017f" that str.lower does not).
    folded: bool = False
    # The end anchor is `$` (not `\Z`): it also matches just before one final newline.
    newline_end: bool = False
    # Can be one alternative of a combined regex: no group references (numbering shifts), no named
    # groups (names would clash), no global inline flags like `(?i)` (they must lead the whole
    # pattern; a rule's ignore_case is a compile flag instead).
    combinable: bool = False


FREE = RegexShape(Shape.FREE)
# Conservative: backreferences, named groups, conditionals, lookbehinds (`(?<`) rule combining out.
_REFERENCES = re.compile(r"\\[1-9]|\(\?P|\(\?\(|\(\?<")


def _load_parser() -> tuple[Any, Any] | None:
    try:
        return importlib.import_module("re._parser"), importlib.import_module("re._constants")
    except ImportError:  # not CPython >= 3.11: every regex is FREE (correct, slower)
        return None


_SRE = _load_parser()


# Global inline flags (`(?i)`, `(?aiLmsux)`): CPython 3.11+ only accepts them at the start.
_GLOBAL_FLAGS = re.compile(r"\(\?[aiLmsux]+\)")


def _wraps(pattern: str) -> bool:
    """Whether `pattern` still compiles inside a group: not if it starts with global flags."""
    return _GLOBAL_FLAGS.match(pattern) is None


def analyze(pattern: str, flags: int = 0) -> RegexShape:
    """The shape of `pattern` compiled with `flags`; FREE whenever in doubt."""
    if _SRE is None:
        return FREE
    parser, c = _SRE
    try:
        parsed = parser.parse(pattern, flags)
        items = list(parsed)
        eff = int(parsed.state.flags)
    except Exception:  # the pattern compiled, so this is the private parser changing: stay safe
        logger.debug("cannot analyze %r; it will always be run", pattern, exc_info=True)
        return FREE
    combinable = not _REFERENCES.search(pattern) and _wraps(pattern)
    folded = bool(eff & re.IGNORECASE)
    multiline = bool(eff & re.MULTILINE)
    starts = {c.AT_BEGINNING_STRING} | (set() if multiline else {c.AT_BEGINNING})
    ends = {c.AT_END_STRING} | (set() if multiline else {c.AT_END})

    def literal_char(item: tuple[Any, Any]) -> str | None:
        op, av = item
        if op is not c.LITERAL:
            return None
        ch = chr(av)
        # With IGNORECASE only ASCII folds the way str.lower does (the caller checks the subject).
        if folded and not ch.isascii():
            return None
        return ch.lower() if folded else ch

    start_anchored = bool(items) and items[0][0] is c.AT and items[0][1] in starts
    end_item = items[-1] if items else None
    end_anchored = end_item is not None and end_item[0] is c.AT and end_item[1] in ends
    newline_end = end_anchored and end_item is not None and end_item[1] is c.AT_END
    body = items[(1 if start_anchored else 0): (len(items) - 1 if end_anchored else len(items))]

    head: list[str] = []
    for item in body:
        ch = literal_char(item)
        if ch is None:
            break
        head.append(ch)
    pure = len(head) == len(body)
    text = "".join(head)
    if start_anchored and pure:
        if end_anchored:
            return RegexShape(Shape.EXACT, text, folded, newline_end, combinable)
        return RegexShape(Shape.PREFIX, text, folded, combinable=combinable)
    if end_anchored and pure:
        return RegexShape(Shape.SUFFIX, text, folded, newline_end, combinable)

    tail: list[str] = []
    for item in reversed(body):
        ch = literal_char(item)
        if ch is None:
            break
        tail.append(ch)
    prefix = text if start_anchored else ""
    suffix = "".join(reversed(tail)) if end_anchored else ""
    if not prefix and not suffix:
        # Still, every top-level literal is required somewhere: keep the longest run of them.
        runs: list[str] = [""]
        run: list[str] = []
        for item in items:
            ch = literal_char(item)
            if ch is None:
                runs.append("".join(run))
                run = []
            else:
                run.append(ch)
        runs.append("".join(run))
        return RegexShape(Shape.FREE, max(runs, key=len), folded, combinable=combinable)
    # The longer literal is the more selective filter (`^example\.com(:\d+)?/<token>$`: the token).
    if len(suffix) > len(prefix):
        return RegexShape(Shape.HAS_SUFFIX, suffix, folded, newline_end, combinable)
    return RegexShape(Shape.HAS_PREFIX, prefix, folded, combinable=combinable)


# A cut right before one of these would split a quantifier from what it repeats.
_QUANTIFIERS = frozenset("*+?{")
# Candidate cut points tried before giving up on factoring (each costs a parse per pattern).
_MAX_CUTS = 8


def factor(patterns: list[str], flags: int = 0) -> str | None:
    """One regex that matches at position 0 iff one of `patterns` does: their common leading text
    written once, then the alternation of what is left of each (`re` checks the first character
    of each alternative before entering it, so this is cheap where the patterns first differ in a
    literal). None when there is no common text that is a clean cut of every pattern, i.e. the
    parse of head + rest is not the parse of the pattern (groups in the head also refuse, as the
    rests would be numbered apart)."""
    if _SRE is None or len(patterns) < 2:
        return None
    parser, _ = _SRE
    common = patterns[0]
    for p in patterns[1:]:
        while not p.startswith(common):
            common = common[:-1]
    whole: dict[str, str] = {}  # each pattern's own parse, made once for every cut tried

    def parse(p: str) -> str:
        pace()  # up to 2 * _MAX_CUTS parses per pattern (runtime.off_loop)
        if p not in whole:
            whole[p] = repr(list(parser.parse(p, flags).data))
        return whole[p]

    tried = 0
    for cut in range(len(common), 0, -1):
        if tried == _MAX_CUTS:
            break
        if any(len(p) > cut and p[cut] in _QUANTIFIERS for p in patterns):
            continue
        tried += 1
        try:
            head = list(parser.parse(common[:cut], flags).data)
            rests = [p[cut:] for p in patterns]
            if all(repr(head + list(parser.parse(p[cut:], flags).data)) == parse(p)
                   for p in patterns):
                return common[:cut] + "(?:" + "|".join(f"(?:{r})" for r in rests) + ")"
        except Exception:  # a head or rest that is not a regex on its own: try a shorter cut
            continue
    return None
