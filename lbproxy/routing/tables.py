"""What a VS's rules become before any source is written: the plain rules grouped by subject, each
group's lookup tables, and the runners the generated function calls (a table entry's candidate
regexes, one scan for free regexes' texts, the slow path for subjects that are not ASCII, the rules
with flags).

How the tables answer and how the function uses them: `compiler.py`, which writes them out
as the source of one function. Everything here is built once per router (in a worker
thread); only the runners run per request, each reached from the generated function's
globals.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config.model import ContentRule, MatchType
from ..runtime import pace
from .prefixes import compile_big, trie_match, trie_regex
from .shapes import Shape, analyze, factor
from .subjects import RequestInfo, Subject, SubjectKey, predicate, subject_for

logger = logging.getLogger(__name__)

Search = Callable[[str], "re.Match[str] | None"]
# Runs a table entry's candidate regexes: (subject, best so far) -> new best.
Runner = Callable[[str, int], int]


@dataclass(frozen=True, slots=True)
class Tuning:
    """Where the compiler switches between ways of doing the same thing (all give the same
    answers; tests move these to reach every way with few rules). Measured on the 2-core bench
    machine with bench/rules_bench.py."""

    # Up to this many keys, a table is a chain of startswith/endswith calls; more: a trie regex
    # (one re.match costs about as much as four startswith calls).
    small: int = 4
    # Tables with at least this many keys get a head/tail prefilter first.
    filter_from: int = 3
    # The prefilter compares this many leading (trailing) characters at most: enough to tell
    # "/api" from "/app", short enough that few keys are shorter.
    head: int = 4
    # Up to this many distinct heads are tested by one str.startswith/endswith(tuple) call (no
    # slice); more go in a set. Heads shorter than 3 characters are only used when no key is
    # longer (a lone "/" rules nothing out).
    few_heads: int = 8
    # From this many start-anchored regexes on one literal, they run as one combined regex
    # (fewer: one re.search each is as cheap).
    combine_from: int = 3
    # Up to this many free regexes are written out inline; more run in a loop that stops early.
    inline_free: int = 8
    # From this many free regexes that need some text (`/item\d+/` needs "/item"), one scan of
    # the subject finds which of those texts it holds, and only their regexes run.
    scan_from: int = 4


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True, slots=True)
class _Entry:
    """One rule in a table: its pattern matches iff the looked-up subject hits one of `keys`
    (direct), or may only match then (candidate: `search` decides)."""

    index: int
    keys: tuple[str, ...]
    negate: bool
    search: Search | None = None
    # For combining start-anchored candidates: the pattern and its compile flags.
    combine: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    index: int
    search: Search
    negate: bool
    literal: str = ""  # text the subject must contain for the regex to match ("": none known)
    folded: bool = False  # ... in the lowercased subject


@dataclass
class Group:
    """The plain rules that look at one subject."""

    key: SubjectKey
    subject: Subject
    lowest: int
    # (kind "exact" | "prefix" | "suffix", folded) -> entries
    tables: dict[tuple[str, bool], list[_Entry]]
    free: list[Candidate]
    # For the slow path, as plain data (no closure per rule: 10,000 rules would otherwise be
    # 30,000 more objects for the garbage collector to walk): (index, test, argument, negate),
    # see slow_runner.
    rules: list[tuple[int, int, Any, bool]]
    # A folded table holds entries derived from regexes, exact only for ASCII subjects.
    ascii_only: bool = False


# The slow path's tests (bits): the subject ends with the argument (else starts with it), the
# lowercased subject does (as subjects.predicate lowercases with ignore_case); or the argument is
# a regex's search.
_T_SUFFIX = 1
_T_FOLD = 2
_T_REGEX = 4


def group_rule(g: Group, i: int, rule: ContentRule) -> None:
    g.lowest = min(g.lowest, i)
    neg = rule.negate

    def put(kind: str, folded: bool, entry: _Entry) -> None:
        g.tables.setdefault((kind, folded), []).append(entry)

    if rule.match_type is not MatchType.REGEX:
        lit = rule.pattern.lower() if rule.ignore_case else rule.pattern
        test = ((_T_SUFFIX if rule.match_type is MatchType.POSTFIX else 0)
                | (_T_FOLD if rule.ignore_case else 0))
        g.rules.append((i, test, lit, neg))
        if rule.match_type is MatchType.PREFIX:
            put("prefix", rule.ignore_case, _Entry(i, (lit,), neg))
        else:
            put("suffix", rule.ignore_case, _Entry(i, (lit[::-1],), neg))
        return
    flags = re.IGNORECASE if rule.ignore_case else 0
    search = re.compile(rule.pattern, flags).search
    g.rules.append((i, _T_REGEX, search, neg))
    shape = analyze(rule.pattern, flags)
    lit, folded = shape.literal, shape.folded
    if shape.shape is Shape.FREE:
        g.free.append(Candidate(i, search, neg, lit, folded))
        g.ascii_only |= folded and bool(lit) and not neg
        return
    g.ascii_only |= folded
    rev = lit[::-1]
    tail = (lit, lit + "\n") if shape.newline_end else (lit,)
    rtail = (rev, "\n" + rev) if shape.newline_end else (rev,)
    if shape.shape is Shape.EXACT:
        put("exact", folded, _Entry(i, tail, neg))
    elif shape.shape is Shape.PREFIX:
        put("prefix", folded, _Entry(i, (lit,), neg))
    elif shape.shape is Shape.SUFFIX:
        put("suffix", folded, _Entry(i, rtail, neg))
    elif shape.shape is Shape.HAS_PREFIX:
        combine = (rule.pattern, flags) if shape.combinable and not neg else None
        put("prefix", folded, _Entry(i, (lit,), neg, search, combine))
    else:
        put("suffix", folded, _Entry(i, rtail, neg, search))


@dataclass(frozen=True, slots=True)
class _Combo:
    """Start-anchored candidates on one text, as one regex (alternatives in precedence order,
    each closed by an empty marker group: m.lastindex -> marks -> the first rule that matches),
    with a cheaper yes/no check run first (their common head factored out) when there is one."""

    lowest: int
    check: Search | None
    match: Search
    marks: tuple[int, ...]


def _combo(entries: list[_Entry]) -> _Combo:
    parts, marks, group = [], [-1], 0
    patterns = []
    flags = 0
    for e in entries:
        pace()
        assert e.combine is not None
        pattern, flags = e.combine
        patterns.append(pattern)
        group += re.compile(pattern, flags).groups + 1
        marks += [-1] * (group - len(marks)) + [e.index]
        parts.append(f"(?:{pattern})()")
    factored = factor(patterns, flags)
    check = compile_big(factored, flags).match if factored is not None else None
    return _Combo(entries[0].index, check, compile_big("|".join(parts), flags).match,
                  tuple(marks))


def _runner(hit: list[_Entry], tuning: Tuning) -> Runner | None:
    """The function running the candidate regexes a table entry hit (None: there are none)."""
    cands = sorted({id(e): e for e in hit if e.search is not None}.values(),
                   key=lambda e: e.index)
    if not cands:
        return None
    by_key: dict[tuple[str, int], list[_Entry]] = {}
    for e in cands:
        if e.combine is not None:
            by_key.setdefault((e.keys[0], e.combine[1]), []).append(e)
    made: list[_Combo] = []
    combined: set[int] = set()
    for same in by_key.values():
        if len(same) < tuning.combine_from:
            continue
        try:
            made.append(_combo(same))
        except re.error:  # not expected (shapes.analyze vets each pattern); run them singly
            logger.warning("cannot combine %d regexes; they run one by one", len(same),
                           exc_info=True)
            continue
        combined.update(id(e) for e in same)
    combos = tuple(sorted(made, key=lambda c: c.lowest))
    singles = tuple((e.index, e.search, e.negate) for e in cands
                    if id(e) not in combined and e.search is not None)

    def run(s: str, best: int) -> int:
        for c in combos:
            if c.lowest < best and (c.check is None or c.check(s) is not None):
                m = c.match(s)
                if m is not None and m.lastindex is not None and c.marks[m.lastindex] < best:
                    best = c.marks[m.lastindex]
        for i, search, neg in singles:
            if i >= best:
                break
            if (search(s) is None) is neg:
                return i
        return best

    return run


def _first_fire(hit: list[_Entry], negated: list[_Entry], n: int) -> int:
    """The first rule that surely fires for a subject that hit the entries `hit`."""
    first = n
    for e in hit:
        if e.search is None and not e.negate:
            first = min(first, e.index)
    if not negated:
        return first
    hit_ids = {id(e) for e in hit}
    for e in negated:  # sorted: the first negated rule whose pattern cannot match fires
        if id(e) not in hit_ids:
            return min(first, e.index)
    return first


# What a table lookup yields per key: the first rule that surely fires, and the runner of the
# candidates to try (None: none).
Value = tuple[int, Runner | None]


@dataclass(frozen=True, slots=True)
class Table:
    kind: str
    folded: bool
    values: dict[str, Value]
    missing: Value
    with_runners: bool
    with_negated: bool
    none: int  # "no rule": the number of rules


def build_table(kind: str, folded: bool, entries: list[_Entry], n: int, tuning: Tuning) -> Table:
    by_key: dict[str, list[_Entry]] = {}
    for e in entries:
        for k in e.keys:
            by_key.setdefault(k, []).append(e)
    negated = sorted((e for e in entries if e.negate), key=lambda e: e.index)
    runners: dict[tuple[str, ...], Runner | None] = {}
    values: dict[str, Value] = {}
    for key in by_key:
        pace()
        if kind == "exact":
            chain = [key]
        else:  # every key that is a prefix of this one is hit as well
            chain = [key[:j] for j in range(len(key) + 1) if key[:j] in by_key]
        hit = [e for k in chain for e in by_key[k]]
        rkey = tuple(k for k in chain if any(e.search is not None for e in by_key[k]))
        if rkey not in runners:
            runners[rkey] = _runner(hit, tuning)
        values[key] = (_first_fire(hit, negated, n), runners[rkey])
    missing: Value = (_first_fire([], negated, n), None)
    return Table(kind, folded, values, missing,
                 with_runners=any(e.search is not None for e in entries),
                 with_negated=bool(negated), none=n)


# --- the runners the generated function calls --------------------------------------------------


def scanner(cands: list[Candidate]) -> tuple[Callable[[str], list[str]],
                                             Callable[[str, list[str], int], int]] | None:
    """(findall: subject -> the longest of the regexes' texts starting at each position where one
    does, run: (subject, found, best) -> new best running just the regexes whose text was found),
    or None when the texts make a regex too deep for `re`."""
    texts = {c.literal for c in cands}
    match = trie_match(texts)  # also vets the trie regex
    if match is None:
        return None
    findall = compile_big("(?=(" + trie_regex(texts) + "))").findall
    # A text found at a position brings along the shorter texts that are prefixes of it.
    chain: dict[str, tuple[tuple[int, Search], ...]] = {}
    for text in texts:
        chain[text] = tuple(sorted(((c.index, c.search) for c in cands
                                    if text.startswith(c.literal)), key=lambda x: x[0]))

    def run(s: str, found: list[str], best: int) -> int:
        todo: set[tuple[int, Search]] = set()
        for text in found:
            todo.update(chain[text])
        for i, search in sorted(todo, key=lambda x: x[0]):
            if i >= best:
                break
            if search(s) is not None:
                return i
        return best

    return findall, run


def slow_runner(rules: list[tuple[int, int, Any, bool]]) -> Runner:
    """The group's rules one by one, for subjects the tables cannot answer for (not ASCII)."""
    steps = tuple(sorted(rules, key=lambda r: r[0]))

    def slow(s: str, best: int) -> int:
        low: str | None = None
        for i, test, arg, neg in steps:
            if i >= best:
                break
            if test & _T_REGEX:
                hit = arg(s) is not None
            else:
                text = s
                if test & _T_FOLD:
                    if low is None:
                        low = s.lower()
                    text = low
                hit = text.endswith(arg) if test & _T_SUFFIX else text.startswith(arg)
            if hit is not neg:
                return i
        return best

    return slow


def flag_runner(flagged: list[tuple[int, ContentRule]]) -> Callable[[RequestInfo, int], int]:
    steps = tuple(
        (i, (1 << r.only_if_flag) if r.only_if_flag else 0,
         (1 << r.only_if_not_flag) if r.only_if_not_flag else 0,
         (1 << r.set_flag) if r.set_flag else 0,
         subject_for(r)[1], predicate(r), r.negate)
        for i, r in flagged)

    def run_flags(req: RequestInfo, best: int) -> int:
        flags = 0
        for i, need, forbid, sets, subject, matches, neg in steps:
            if i >= best:
                break
            if (need and not flags & need) or flags & forbid:
                continue
            if matches(subject(req)) is not neg:
                if sets:
                    flags |= sets
                    continue
                return i
        return best

    return run_flags
