"""Writing a VS's rules, grouped and tabled by `tables.py`, as the source of the one Python function
the router calls per request, and compiling it.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config.model import ContentRule, MatchOn
from ..runtime import pace
from .prefixes import prefix_lookup, trie_match
from .subjects import RequestInfo, SubjectKey, body_text, hostname, subject_for
from .tables import (
    DEFAULT_TUNING,
    Candidate,
    Group,
    Table,
    Tuning,
    Value,
    build_table,
    flag_runner,
    group_rule,
    scanner,
    slow_runner,
)


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


def _subject_lines(out: _Source, d: int, g: Group) -> None:
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


def _table_lines(out: _Source, d: int, t: Table, var: str, tuning: Tuning) -> None:
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


def _free_lines(out: _Source, d: int, free: list[Candidate], tuning: Tuning) -> None:
    free = sorted(free, key=lambda c: c.index)
    for folded in (False, True):
        scanned = [c for c in free if c.literal and not c.negate and c.folded is folded]
        if len(scanned) < tuning.scan_from:
            continue
        made = scanner(scanned)
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


def _group_lines(out: _Source, g: Group, n: int, tuning: Tuning, first: bool) -> None:
    # The first group always runs (its lowest rule is ahead of `default`). The comment names the
    # kind of subject only: a header name is config text, and config text never enters source.
    kind = "/".join(g.key) if g.key[0] == "url" else g.key[0]
    out.add(1, f"if {'True' if first else f'{g.lowest} < best'}:  # subject {kind}")
    d = 2
    _subject_lines(out, d, g)
    if g.ascii_only:
        slow = slow_runner(g.rules)
        out.add(d, f"if not s.isascii(): best = {out.const('slow', slow)}(s, best)")
        out.add(d, "else:")
        d += 1
    folded = any(f for _, f in g.tables) or any(c.folded and c.literal for c in g.free)
    if folded:
        out.add(d, "f = s.lower()")
    for (kind, fold), entries in sorted(g.tables.items()):
        table = build_table(kind, fold, entries, n, tuning)
        _table_lines(out, d, table, "f" if fold else "s", tuning)
    _free_lines(out, d, g.free, tuning)


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
    groups: dict[SubjectKey, Group] = {}
    flagged: list[tuple[int, ContentRule]] = []
    for i, r in live:
        pace()
        if r.set_flag or r.only_if_flag or r.only_if_not_flag:
            flagged.append((i, r))
            continue
        key, subject = subject_for(r)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(key, subject, n, {}, [], [])
        group_rule(g, i, r)
    out = _Source()
    out.add(0, "def first(req):")
    out.add(1, f"best = {cap}")
    for j, g in enumerate(sorted(groups.values(), key=lambda g: g.lowest)):
        _group_lines(out, g, n, tuning, first=j == 0)
    if flagged:
        out.add(1, f"if {flagged[0][0]} < best: "
                   f"best = {out.const('flags', flag_runner(flagged))}(req, best)")
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
