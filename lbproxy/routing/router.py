"""A VS's content rules compiled into an immutable router: one call per request picks the SubVS.

Semantics (LoadMaster's content switching, issue 2):

- Rules are evaluated in precedence order (`config.model.rule_order`); the first rule that matches
  decides. The built-in rule `default` matches everything.
- A rule with flag conditions is skipped unless flag `only_if_flag` is set (when non-zero) and flag
  `only_if_not_flag` is not set (when non-zero). Flags start cleared for every request.
- Matching: `prefix` = the subject starts with the pattern, `postfix` = it ends with it, `regex` =
  `re.search` finds it anywhere (anchor it with `^`/`$` yourself). `ignore_case` lowercases both
  subject and pattern (`str.lower`) for prefix and postfix and compiles a regex with
  `re.IGNORECASE`. `negate` inverts the outcome of the match.
- The subject, by `on`:
  - `url`: the path as sent (percent-encoded, without the query); with `include_query`,
    path + "?" + query when the request has a query; with `include_host`, the Host header as sent
    (lowercased, with its port if one was sent) in front, e.g. `example.com:8080/a?b=1`.
  - `host`: the Host header without its port, lowercased (`[::1]` keeps its brackets).
  - `method`: the method; `src-ip`: the client's IP address as text.
  - `header`: the named header's value (several values joined with ", "; missing = "").
  - `body`: the first 50 KiB of the body (`BODY_MATCH_LIMIT`), decoded as UTF-8 with
    `surrogateescape` (bytes that are not UTF-8 stay distinct and never match text).
- When a rule matches: if it sets a flag, the flag is set and evaluation continues with the next
  rule (a flag-setting rule is a marker, never a choice); otherwise, with `fail_on_match`, the
  request is refused (`REFUSE`); otherwise its SubVS is selected. Nothing matched: `NO_MATCH`.

How it stays cheap with 1024 rules (DESIGN.md section 3): rules are grouped by subject; within a
group, prefix rules, postfix rules (on the reversed subject) and regexes that are just anchored
text (`shapes.py`) become longest-prefix tables (`prefixes.py`) and exact-match dicts, each entry
holding the precomputed first firing rule, negated rules included; the other regexes anchored on
literal text only run when the subject carries that text, and only while they could still beat
the best rule found so far. Groups run in the order of their first rule and stop as soon as no
group can beat the best match. Rules with flag conditions or `set_flag` depend on evaluation order
and are checked one by one, but only those ahead of the first plain match.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..config.model import (
    BODY_MATCH_LIMIT,
    DEFAULT_RULE,
    ContentRule,
    MatchOn,
    MatchType,
    VirtualService,
    rule_order,
)
from ..errors import ConfigError, ConfigProblem
from .prefixes import prefix_lookup
from .shapes import Shape, analyze

logger = logging.getLogger(__name__)

NO_MATCH: int = -1
REFUSE: int = -2


class RequestInfo(Protocol):
    """What the router reads from a request; the data plane's request object provides it."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...  # as sent: percent-encoded, without the query
    @property
    def query(self) -> str: ...  # without the "?"; "" when there is none
    @property
    def host(self) -> str: ...  # the Host header as sent, lowercased, with ":port" if sent
    @property
    def src_ip(self) -> str: ...
    @property
    def body(self) -> bytes: ...  # first BODY_MATCH_LIMIT bytes when Router.needs_body, else b""

    def header(self, name: str) -> str:
        """The value of header `name` (lowercase); several joined with ", "; "" if absent."""
        ...


Subject = Callable[[RequestInfo], str]
Search = Callable[[str], "re.Match[str] | None"]
# A candidate regex: (rule index, its compiled search, negate).
Candidate = tuple[int, Search, bool]
# What a prefix/suffix/exact table yields: (first rule index that fires for sure, candidates to run)
NodeValue = tuple[int, tuple[Candidate, ...]]


@dataclass(frozen=True, slots=True)
class Router:
    """The compiled content rules of one VS for one config generation. Immutable; thread-safe."""

    subvs_names: tuple[str, ...]  # SubVS index -> name (the VS's SubVSs in config order)
    rule_names: tuple[str, ...]  # rule index -> name, in precedence order ("default" included)
    needs_body: bool  # a live rule matches on the body: buffer up to BODY_MATCH_LIMIT first
    _first: Callable[[RequestInfo], int] = field(repr=False, compare=False)
    _outcomes: tuple[int, ...] = field(repr=False, compare=False)  # rule index -> route() answer

    def route(self, req: RequestInfo) -> int:
        """The SubVS index for `req`, or NO_MATCH, or REFUSE (a fail-on-match rule matched)."""
        return self._outcomes[self._first(req)]

    def route_with_rule(self, req: RequestInfo) -> tuple[int, int]:
        """(route(req), index in rule_names of the deciding rule or NO_MATCH), for hit counters."""
        i = self._first(req)
        return self._outcomes[i], (i if i < len(self.rule_names) else NO_MATCH)


def hostname(host: str) -> str:
    """The Host header without its port: "a.example:8080" -> "a.example", "[::1]:80" -> "[::1]"."""
    if host.startswith("["):
        end = host.find("]")
        return host if end < 0 else host[:end + 1]
    colon = host.find(":")
    return host if colon < 0 else host[:colon]


def compile_router(vs: VirtualService, rules: Mapping[str, ContentRule]) -> Router:
    """Compile `vs`'s rules (named in `rule_order(vs)`, defined in `rules`) into a Router."""
    order = rule_order(vs)
    subvs_index = {s.name: i for i, s in enumerate(vs.subvs)}
    problems = [ConfigProblem(f"vs {vs.name!r}", f"unknown content rule {rn!r}")
                for rn, _ in order if rn != DEFAULT_RULE and rn not in rules]
    problems += [ConfigProblem(f"vs {vs.name!r}", f"unknown SubVS {sn!r}")
                 for _, sn in order if sn not in subvs_index]
    if problems:
        raise ConfigError(problems)
    n = len(order)
    outcomes = [REFUSE if rn != DEFAULT_RULE and rules[rn].fail_on_match else subvs_index[sn]
                for rn, sn in order]
    outcomes.append(NO_MATCH)  # index n: nothing matched
    # Nothing after the first `default` can ever be reached.
    cap = next((i for i, (rn, _) in enumerate(order) if rn == DEFAULT_RULE), n)
    live = [(i, rules[rn]) for i, (rn, _) in enumerate(order[:cap])]
    plain = [(i, r) for i, r in live
             if not (r.set_flag or r.only_if_flag or r.only_if_not_flag)]
    flagged = [(i, r) for i, r in live if r.set_flag or r.only_if_flag or r.only_if_not_flag]

    builders: dict[tuple[str, ...], _GroupBuilder] = {}
    for i, r in plain:
        key, subject = subject_for(r)
        builders.setdefault(key, _GroupBuilder(subject, n)).add(i, r)
    groups = tuple(sorted((b.lowest, b.build()) for b in builders.values()))
    first = _first_function(cap, groups, _flag_function(flagged))
    return Router(
        subvs_names=tuple(s.name for s in vs.subvs),
        rule_names=tuple(rn for rn, _ in order),
        needs_body=any(r.on is MatchOn.BODY for _, r in live),
        _first=first,
        _outcomes=tuple(outcomes),
    )


# --- subjects -------------------------------------------------------------------------------


def _url(req: RequestInfo) -> str:
    return req.path


def _url_query(req: RequestInfo) -> str:
    q = req.query
    return req.path + "?" + q if q else req.path


def _url_host(req: RequestInfo) -> str:
    return req.host + req.path


def _url_host_query(req: RequestInfo) -> str:
    q = req.query
    return req.host + req.path + "?" + q if q else req.host + req.path


def _host(req: RequestInfo) -> str:
    return hostname(req.host)


def _method(req: RequestInfo) -> str:
    return req.method


def _src_ip(req: RequestInfo) -> str:
    return req.src_ip


def _body(req: RequestInfo) -> str:
    return bytes(req.body[:BODY_MATCH_LIMIT]).decode("utf-8", "surrogateescape")


_URL_SUBJECTS: dict[tuple[bool, bool], Subject] = {
    (False, False): _url, (False, True): _url_query,
    (True, False): _url_host, (True, True): _url_host_query,
}


def subject_for(rule: ContentRule) -> tuple[tuple[str, ...], Subject]:
    """(a key equal for rules that look at the same text, the function extracting that text)."""
    on = rule.on
    if on is MatchOn.URL:
        return (("url", str(rule.include_host), str(rule.include_query)),
                _URL_SUBJECTS[(rule.include_host, rule.include_query)])
    if on is MatchOn.HEADER:
        name = rule.header.lower()

        def header(req: RequestInfo) -> str:
            return req.header(name)

        return ("header", name), header
    simple: dict[MatchOn, Subject] = {MatchOn.HOST: _host, MatchOn.METHOD: _method,
                                      MatchOn.SRC_IP: _src_ip, MatchOn.BODY: _body}
    return (on.value,), simple[on]


def predicate(rule: ContentRule) -> Callable[[str], bool]:
    """Does the subject match the rule's pattern (before negation)? One rule at a time."""
    pattern, fold = rule.pattern, rule.ignore_case
    if rule.match_type is MatchType.REGEX:
        search = re.compile(pattern, re.IGNORECASE if fold else 0).search
        return lambda s: search(s) is not None
    if fold:
        lowered = pattern.lower()
        if rule.match_type is MatchType.PREFIX:
            return lambda s: s.lower().startswith(lowered)
        return lambda s: s.lower().endswith(lowered)
    if rule.match_type is MatchType.PREFIX:
        return lambda s: s.startswith(pattern)
    return lambda s: s.endswith(pattern)


# --- one group: the plain rules that look at the same subject -------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    keys: tuple[str, ...]  # the rule's pattern matches iff the (looked-up) subject hits a key
    negate: bool
    search: Search | None  # None: a key hit decides; else a key hit only makes it a candidate


GroupEval = Callable[[RequestInfo, int], int]  # (request, best so far) -> new best


class _GroupBuilder:
    """Collects a group's rules, then builds its evaluator."""

    def __init__(self, subject: Subject, n: int) -> None:
        self.subject = subject
        self.n = n
        self.lowest = n
        # (kind "prefix"|"suffix"|"exact", folded) -> entries
        self.tables: dict[tuple[str, bool], list[_Entry]] = {}
        self.free: list[Candidate] = []
        self.rules: list[tuple[int, Callable[[str], bool], bool]] = []
        # A case-folded table holds entries derived from regexes: only exact for ASCII subjects.
        self.ascii_only = False

    def _put(self, kind: str, folded: bool, entry: _Entry) -> None:
        self.tables.setdefault((kind, folded), []).append(entry)

    def add(self, i: int, rule: ContentRule) -> None:
        self.lowest = min(self.lowest, i)
        neg = rule.negate
        self.rules.append((i, predicate(rule), neg))
        if rule.match_type is not MatchType.REGEX:
            lit = rule.pattern.lower() if rule.ignore_case else rule.pattern
            if rule.match_type is MatchType.PREFIX:
                self._put("prefix", rule.ignore_case, _Entry(i, (lit,), neg, None))
            else:
                self._put("suffix", rule.ignore_case, _Entry(i, (lit[::-1],), neg, None))
            return
        flags = re.IGNORECASE if rule.ignore_case else 0
        search = re.compile(rule.pattern, flags).search
        shape = analyze(rule.pattern, flags)
        lit, folded = shape.literal, shape.folded
        if shape.shape is Shape.FREE:
            self.free.append((i, search, neg))
            return
        self.ascii_only |= folded
        rev = lit[::-1]
        if shape.shape is Shape.EXACT:
            keys = (lit, lit + "\n") if shape.newline_end else (lit,)
            self._put("exact", folded, _Entry(i, keys, neg, None))
        elif shape.shape is Shape.PREFIX:
            self._put("prefix", folded, _Entry(i, (lit,), neg, None))
        elif shape.shape is Shape.SUFFIX:
            keys = (rev, "\n" + rev) if shape.newline_end else (rev,)
            self._put("suffix", folded, _Entry(i, keys, neg, None))
        elif shape.shape is Shape.HAS_PREFIX:
            self._put("prefix", folded, _Entry(i, (lit,), neg, search))
        else:
            keys = (rev, "\n" + rev) if shape.newline_end else (rev,)
            self._put("suffix", folded, _Entry(i, keys, neg, search))

    def build(self) -> GroupEval:
        lookups: list[Callable[[str, str], NodeValue]] = []
        for (kind, folded), entries in sorted(self.tables.items()):
            lookups.append(_lookup(kind, folded, entries, self.n))
        return _group_function(self.subject, tuple(lookups), tuple(sorted(self.free, key=_idx)),
                               tuple(sorted(self.rules, key=_idx)),
                               fold=any(f for _, f in self.tables), ascii_only=self.ascii_only)


def _idx(item: tuple[int, object, bool]) -> int:
    return item[0]


def _node_value(hit: list[_Entry], negated: list[_Entry], n: int) -> NodeValue:
    """For a subject whose lookup hit the entries `hit`: the first rule that fires for sure, and
    the regexes still to run (only those that could beat it)."""
    hit_ids = {id(e) for e in hit}
    first = n
    for e in hit:
        if e.search is None and not e.negate:
            first = min(first, e.index)
    for e in negated:  # sorted: the first negated rule whose pattern cannot match fires
        if id(e) not in hit_ids:
            first = min(first, e.index)
            break
    cands = sorted({(e.index, e.search, e.negate) for e in hit
                    if e.search is not None and e.index < first}, key=_idx)
    return first, tuple(cands)


def _lookup(kind: str, folded: bool, entries: list[_Entry], n: int
            ) -> Callable[[str, str], NodeValue]:
    """(subject, lowercased subject) -> NodeValue for one table of a group."""
    by_key: dict[str, list[_Entry]] = {}
    for e in entries:
        for k in e.keys:
            by_key.setdefault(k, []).append(e)
    negated = sorted((e for e in entries if e.negate), key=lambda e: e.index)
    missing = _node_value([], negated, n)
    if kind == "exact":
        exact = {k: _node_value(es, negated, n) for k, es in by_key.items()}
        if folded:
            return lambda s, f: exact.get(f, missing)
        return lambda s, f: exact.get(s, missing)
    table: dict[str, NodeValue] = {}
    for key in by_key:
        # Every key that is a prefix of this one is hit too (they form a chain).
        hit = [e for j in range(len(key) + 1) for e in by_key.get(key[:j], ())]
        table[key] = _node_value(hit, negated, n)
    look = prefix_lookup(table, missing)
    if kind == "prefix":
        if folded:
            return lambda s, f: look(f)
        return lambda s, f: look(s)
    if folded:
        return lambda s, f: look(f[::-1])
    return lambda s, f: look(s[::-1])


def _group_function(subject: Subject, lookups: tuple[Callable[[str, str], NodeValue], ...],
                    free: tuple[Candidate, ...],
                    rules: tuple[tuple[int, Callable[[str], bool], bool], ...],
                    fold: bool, ascii_only: bool) -> GroupEval:
    def slow(s: str, best: int) -> int:
        for i, matches, neg in rules:
            if i >= best:
                break
            if matches(s) is not neg:
                return i
        return best

    def evaluate(req: RequestInfo, best: int) -> int:
        s = subject(req)
        if ascii_only and not s.isascii():
            return slow(s, best)
        f = s.lower() if fold else s
        pending = []
        for look in lookups:
            first, cands = look(s, f)
            if first < best:
                best = first
            if cands:
                pending.append(cands)
        if free:
            pending.append(free)
        for cands in pending:
            for i, search, neg in cands:
                if i >= best:
                    break
                if (search(s) is None) is neg:
                    best = i
                    break
        return best

    return evaluate


# --- putting it together ---------------------------------------------------------------------


FlagEval = Callable[[RequestInfo, int], int]


def _flag_function(flagged: list[tuple[int, ContentRule]]) -> tuple[int, FlagEval] | None:
    """The one-by-one evaluator of the rules that set or test flags, or None if there are none."""
    if not flagged:
        return None
    steps = tuple(
        (i, (1 << r.only_if_flag) if r.only_if_flag else 0,
         (1 << r.only_if_not_flag) if r.only_if_not_flag else 0,
         (1 << r.set_flag) if r.set_flag else 0,
         subject_for(r)[1], predicate(r), r.negate)
        for i, r in flagged)

    def evaluate(req: RequestInfo, best: int) -> int:
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

    return flagged[0][0], evaluate


def _first_function(cap: int, groups: tuple[tuple[int, GroupEval], ...],
                    flags: tuple[int, FlagEval] | None) -> Callable[[RequestInfo], int]:
    """req -> index of the deciding rule (n = none)."""
    if flags is None:
        def first(req: RequestInfo) -> int:
            best = cap
            for lowest, evaluate in groups:
                if lowest >= best:
                    break
                best = evaluate(req, best)
            return best

        return first
    flag_lowest, flag_eval = flags

    def first_with_flags(req: RequestInfo) -> int:
        best = cap
        for lowest, evaluate in groups:
            if lowest >= best:
                break
            best = evaluate(req, best)
        if flag_lowest < best:
            best = flag_eval(req, best)
        return best

    return first_with_flags
