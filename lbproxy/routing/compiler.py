"""Compiling a VS's rules into the one Python function the router calls per request.

Plain rules (no flags) are grouped by subject. Within a group, prefix rules, postfix rules (on the
reversed subject) and regexes that are just anchored text (`shapes.py`) become tables: a
longest-prefix lookup (`prefixes.py`) or an exact-match dict whose every entry holds the first
rule that surely fires for a subject ending there, negated rules included. Other regexes anchored
on text are "candidates" of the table entry for their text and only run when the subject carries
it; several start-anchored candidates with the same text run as one combined `re.match` whose
alternatives are in precedence order, so the first alternative that matches is the first rule.
Unanchored regexes that need some text run only when one lookahead scan of the subject finds
it; regexes with no text to go by run one by one, and only while they could still beat the best
match found so far. Every table gets a head/tail prefilter (`str.startswith(tuple)` or a slice in
a set), so a request that hits none of a table's keys pays one string operation for it.

The groups are then written out as the source of one function (no closure call per table, no
loop over groups) and compiled with `compile()`/`exec()`. The source only ever contains names
this module makes up and integers; every pattern, key and table reaches it through the
function's globals, never as text.

Rules that set or test flags depend on evaluation order: they run one by one after the groups,
only those ahead of the best plain match (LoadMaster uses them sparingly).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config.model import ContentRule, MatchOn, MatchType
from ..runtime import pace
from .prefixes import compile_big, prefix_lookup, trie_match, trie_regex
from .shapes import Shape, analyze, factor
from .subjects import RequestInfo, Subject, SubjectKey, body_text, hostname, predicate, subject_for

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
class _Candidate:
    index: int
    search: Search
    negate: bool
    literal: str = ""  # text the subject must contain for the regex to match ("": none known)
    folded: bool = False  # ... in the lowercased subject


@dataclass
class _Group:
    """The plain rules that look at one subject."""

    key: SubjectKey
    subject: Subject
    lowest: int
    # (kind "exact" | "prefix" | "suffix", folded) -> entries
    tables: dict[tuple[str, bool], list[_Entry]]
    free: list[_Candidate]
    # For the slow path, as plain data (no closure per rule: 10,000 rules would otherwise be
    # 30,000 more objects for the garbage collector to walk): (index, test, argument, negate),
    # see _slow_runner.
    rules: list[tuple[int, int, Any, bool]]
    # A folded table holds entries derived from regexes, exact only for ASCII subjects.
    ascii_only: bool = False


# The slow path's tests (bits): the subject ends with the argument (else starts with it), the
# lowercased subject does (as subjects.predicate lowercases with ignore_case); or the argument is
# a regex's search.
_T_SUFFIX = 1
_T_FOLD = 2
_T_REGEX = 4


def _group_rule(g: _Group, i: int, rule: ContentRule) -> None:
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
        g.free.append(_Candidate(i, search, neg, lit, folded))
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
class _Table:
    kind: str
    folded: bool
    values: dict[str, Value]
    missing: Value
    with_runners: bool
    with_negated: bool
    none: int  # "no rule": the number of rules


def _table(kind: str, folded: bool, entries: list[_Entry], n: int, tuning: Tuning) -> _Table:
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
    return _Table(kind, folded, values, missing,
                  with_runners=any(e.search is not None for e in entries),
                  with_negated=bool(negated), none=n)


# --- writing the function ----------------------------------------------------------------------


class _Source:
    """Lines of Python plus the globals they refer to (by made-up names only)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.env: dict[str, Any] = {}

    def const(self, prefix: str, value: object) -> str:
        name = f"{prefix}{len(self.env)}"
        self.env[name] = value
        return name

    def add(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)


def _subject_lines(out: _Source, d: int, g: _Group) -> None:
    kind = g.key[0]
    if kind == "url":
        host, query = g.key[1] == "True", g.key[2] == "True"
        base = "req.host + req.path" if host else "req.path"
        if query:
            out.add(d, "q = req.query")
            out.add(d, f's = {base} + "?" + q if q else {base}')
        else:
            out.add(d, f"s = {base}")
    elif kind == MatchOn.HOST.value:
        out.add(d, "s = req.host")
        out.add(d, f'if ":" in s: s = s.partition(":")[0] if s[0] != "[" '
                   f'else {out.const("hostname", hostname)}(s)')
    elif kind == MatchOn.METHOD.value:
        out.add(d, "s = req.method")
    elif kind == MatchOn.SRC_IP.value:
        out.add(d, "s = req.src_ip")
    elif kind == MatchOn.HEADER.value:
        out.add(d, f"s = req.header({out.const('name', g.key[1])})")
    else:
        out.add(d, f"s = {out.const('body', body_text)}(req)")


def _prefilter(keys: list[str], suffix: bool, tuning: Tuning
               ) -> tuple[str, int, frozenset[str] | tuple[str, ...]]:
    """How to rule out, cheaply, that a subject starts (ends, for a suffix table whose keys are
    reversed) with any key, by its first (last) k <= tuning.head characters: ("tuple", k, heads)
    for one str.startswith/endswith call when the heads are few, ("set", k, heads) for a slice
    and a set lookup, or ("none", 0, ()) when no test helps (an empty key matches everything)."""
    if not keys or "" in keys:
        return "none", 0, ()
    longest = min(tuning.head, *(len(key) for key in keys))
    for k in range(longest, min(longest, 3) - 1, -1):
        heads = {key[:k][::-1] if suffix else key[:k] for key in keys}
        if len(heads) <= tuning.few_heads:
            return "tuple", k, tuple(sorted(heads))
    return "set", longest, frozenset(key[:longest][::-1] if suffix else key[:longest]
                                     for key in keys)


def _table_lines(out: _Source, d: int, t: _Table, var: str, tuning: Tuning) -> None:
    """Look subject `var` ("s" or its lowercase "f") up in table `t` and lower `best`; run the
    candidates of the entry hit. Only a hit costs more than the prefilter."""
    suffix = t.kind == "suffix"

    def apply(d: int, value: str) -> None:
        """Lower best by the value held in expression `value` (an int, or (int, runner))."""
        if t.with_runners:
            out.add(d, f"v, c = {value}")
            out.add(d, "if v < best: best = v")
            out.add(d, "if c is not None: best = c(s, best)")
        else:
            out.add(d, f"v = {value}")
            out.add(d, "if v < best: best = v")

    def apply_missing(d: int) -> None:
        if t.missing[0] < t.none:  # a negated rule fires when no key is hit
            out.add(d, f"if {t.missing[0]} < best: best = {t.missing[0]}")

    def const(x: Value) -> str:
        return out.const("val", x if t.with_runners else x[0])

    if t.kind == "exact":
        table = {k: (x if t.with_runners else x[0]) for k, x in t.values.items()}
        apply(d, f"{out.const('exact', table)}.get({var}, {const(t.missing)})")
        return
    keys = list(t.values)
    how, k, heads = _prefilter(keys, suffix, tuning)
    filtered = how != "none" and len(keys) >= tuning.filter_from
    if filtered:
        if how == "tuple":
            method = "endswith" if suffix else "startswith"
            out.add(d, f"if {var}.{method}({out.const('heads', heads)}):")
        else:
            cut = f"{var}[-{k}:]" if suffix else f"{var}[:{k}]"
            out.add(d, f"if {cut} in {out.const('heads', heads)}:")
        d += 1
    if len(keys) <= tuning.small:  # a few startswith/endswith calls, longest key first; no reversal
        method = "endswith" if suffix else "startswith"
        for j, key in enumerate(sorted(keys, key=len, reverse=True)):
            text = out.const("key", key[::-1] if suffix else key)
            out.add(d, f"{'if' if j == 0 else 'elif'} {var}.{method}({text}):")
            apply(d + 1, const(t.values[key]))
        if t.missing[0] < t.none:
            out.add(d, "else:")
            apply_missing(d + 1)
    else:
        plain = {key: (x if t.with_runners else x[0]) for key, x in t.values.items()}
        subject = f"{var}[::-1]" if suffix else var
        match = trie_match(plain)
        if match is not None:
            out.add(d, f"m = {out.const('trie', match)}({subject})")
            out.add(d, "if m is not None:")
            apply(d + 1, f"{out.const('table', plain)}[m[0]]")
            if t.missing[0] < t.none:
                out.add(d, "else:")
                apply_missing(d + 1)
        else:
            look = prefix_lookup(plain, t.missing if t.with_runners else t.missing[0])
            apply(d, f"{out.const('look', look)}({subject})")
    if filtered and t.missing[0] < t.none:
        out.add(d - 1, "else:")
        apply_missing(d)


def _scanner(cands: list[_Candidate]) -> tuple[Callable[[str], list[str]],
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


def _free_lines(out: _Source, d: int, free: list[_Candidate], tuning: Tuning) -> None:
    free = sorted(free, key=lambda c: c.index)
    for folded in (False, True):
        scanned = [c for c in free if c.literal and not c.negate and c.folded is folded]
        if len(scanned) < tuning.scan_from:
            continue
        made = _scanner(scanned)
        if made is None:
            continue
        findall, run = made
        out.add(d, f"found = {out.const('scan', findall)}({'f' if folded else 's'})")
        out.add(d, f"if found: best = {out.const('scanned', run)}(s, found, best)")
        gone = {id(c) for c in scanned}
        free = [c for c in free if id(c) not in gone]
    if len(free) <= tuning.inline_free:
        for c in free:
            test = "is None" if c.negate else "is not None"
            out.add(d, f"if {c.index} < best and {out.const('rx', c.search)}(s) {test}: "
                       f"best = {c.index}")
        return
    steps = tuple((c.index, c.search, c.negate) for c in free)

    def run_free(s: str, best: int) -> int:
        for i, search, neg in steps:
            if i >= best:
                break
            if (search(s) is None) is neg:
                return i
        return best

    out.add(d, f"best = {out.const('free', run_free)}(s, best)")


def _group_lines(out: _Source, g: _Group, n: int, tuning: Tuning, first: bool) -> None:
    # The first group always runs (its lowest rule is ahead of `default`). The comment names the
    # kind of subject only: a header name is config text, and config text never enters source.
    kind = "/".join(g.key) if g.key[0] == "url" else g.key[0]
    out.add(1, f"if {'True' if first else f'{g.lowest} < best'}:  # subject {kind}")
    d = 2
    _subject_lines(out, d, g)
    if g.ascii_only:
        slow = _slow_runner(g.rules)
        out.add(d, f"if not s.isascii(): best = {out.const('slow', slow)}(s, best)")
        out.add(d, "else:")
        d += 1
    folded = any(f for _, f in g.tables) or any(c.folded and c.literal for c in g.free)
    if folded:
        out.add(d, "f = s.lower()")
    for (kind, fold), entries in sorted(g.tables.items()):
        _table_lines(out, d, _table(kind, fold, entries, n, tuning), "f" if fold else "s", tuning)
    _free_lines(out, d, g.free, tuning)


def _slow_runner(rules: list[tuple[int, int, Any, bool]]) -> Runner:
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


def _flag_runner(flagged: list[tuple[int, ContentRule]]) -> Callable[[RequestInfo, int], int]:
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


@dataclass(frozen=True, slots=True)
class Compiled:
    """first(req) -> index of the deciding rule (n: none); route(req) -> outcome; the source."""

    first: Callable[[RequestInfo], int]
    route: Callable[[RequestInfo], int]
    source: str


def compile_rules(rules: list[ContentRule | None], outcomes: tuple[int, ...],
                  tuning: Tuning = DEFAULT_TUNING) -> Compiled:
    """`rules` in precedence order, None for `default`; outcomes[i] is route()'s answer when rule
    i decides, outcomes[len(rules)] when none does."""
    n = len(rules)
    cap = next((i for i, r in enumerate(rules) if r is None), n)  # nothing after `default` runs
    live = [(i, r) for i, r in enumerate(rules[:cap]) if r is not None]
    pace()
    groups: dict[SubjectKey, _Group] = {}
    flagged: list[tuple[int, ContentRule]] = []
    for i, r in live:
        pace()
        if r.set_flag or r.only_if_flag or r.only_if_not_flag:
            flagged.append((i, r))
            continue
        key, subject = subject_for(r)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(key, subject, n, {}, [], [])
        _group_rule(g, i, r)
    out = _Source()
    out.add(0, "def first(req):")
    out.add(1, f"best = {cap}")
    for j, g in enumerate(sorted(groups.values(), key=lambda g: g.lowest)):
        _group_lines(out, g, n, tuning, first=j == 0)
    if flagged:
        out.add(1, f"if {flagged[0][0]} < best: "
                   f"best = {out.const('flags', _flag_runner(flagged))}(req, best)")
    # The build's own structures (an _Entry per rule) go table by table: freed all at once when
    # this returns, they would hold the GIL for milliseconds without a break while the serving
    # loop waits for it (routers are compiled in a worker thread: runtime.off_loop).
    for g in groups.values():
        for entries in g.tables.values():
            entries.clear()
            pace()
    groups.clear()
    body = out.lines[1:]
    out.add(1, "return best")
    # route() is the same body answering the outcome: one call less on the hot path.
    out.add(0, "def route(req):")
    out.lines.extend(body)
    out.add(1, f"return {out.const('outcomes', outcomes)}[best]")
    source = "\n".join(out.lines) + "\n"
    env = dict(out.env)
    exec(compile(source, "<content rules>", "exec"), env)  # our own source: see the docstring
    # Out of their own globals: no reference cycle, so a retired router is freed by reference
    # counting as soon as nothing uses it (not by a full collection, which would walk it until
    # then; nor never, when gc.freeze() hid it: app.py freezes the first generation).
    return Compiled(env.pop("first"), env.pop("route"), source)


def needs_body(rules: list[ContentRule | None]) -> bool:
    """Whether a rule that can run (none after `default`) matches on the body."""
    for r in rules:
        if r is None:
            return False
        if r.on is MatchOn.BODY:
            return True
    return False
