"""A VS's content rules compiled into an immutable router: one call per request picks the SubVS.

Semantics (LoadMaster's content switching, issue 2):

- Rules are evaluated in precedence order (`config.model.rule_order`); the first rule that matches
  decides. The built-in rule `default` matches everything.
- A rule with flag conditions is skipped unless flag `only_if_flag` is set (when non-zero) and flag
  `only_if_not_flag` is not set (when non-zero). Flags start cleared for every request.
- Matching: `prefix` = the subject starts with the pattern, `postfix` = it ends with it, `regex` =
  `re.search` finds it anywhere (anchor it with `^`/`$` yourself). `ignore_case` lowercases both
  subject and pattern (`str.lower`) for prefix and postfix and compiles a regex with
  `re.IGNORECASE` (whose Unicode folding knows a few pairs str.lower does not, e.g. the long s
  folds to "s"; the router keeps re's meaning). `negate` inverts the outcome of the match.
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
  Rules after `default` are never reached.

How it stays cheap with 1024 rules (docs/architecture.md, the hot path): see `compiler.py`. Rules
are grouped by subject; prefixes, postfixes and regexes that are just anchored text become
longest-prefix tables and dicts with the answer precomputed; other regexes only run when the
subject carries their literal text; the whole thing is one generated function per router.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config.model import DEFAULT_RULE, ContentRule, MatchOn, VirtualService, rule_order
from ..errors import ConfigError, ConfigProblem
from ..runtime import pace
from .compiler import compile_rules, needs_body
from .subjects import RequestInfo
from .tables import DEFAULT_TUNING, Tuning

logger = logging.getLogger(__name__)

NO_MATCH: int = -1
REFUSE: int = -2

MEMO_NONE = 0
MEMO_URL = 1
MEMO_HOST_URL = 2

__all__ = ["MEMO_HOST_URL", "MEMO_NONE", "MEMO_URL", "NO_MATCH", "REFUSE", "RequestInfo", "Router",
           "Tuning", "compile_router"]


@dataclass(frozen=True, slots=True)
class Router:
    """The compiled content rules of one VS for one config generation. Immutable; thread-safe.

    `route(req)` is a plain function stored on the router (no bound-method layer on the hot path):
    it answers the SubVS index for `req` (into `subvs_names`), NO_MATCH, or REFUSE (a
    fail-on-match rule decided).
    """

    subvs_names: tuple[str, ...]  # SubVS index -> name (the VS's SubVSs in config order)
    rule_names: tuple[str, ...]  # rule index -> name, in precedence order ("default" included)
    needs_body: bool  # a live rule matches on the body: buffer up to BODY_MATCH_LIMIT first
    route: Callable[[RequestInfo], int] = field(repr=False, compare=False)
    # decide(req): the index of the deciding rule (len(rule_names) when none matched), for callers
    # that count rule hits; outcomes[that index] is route()'s answer.
    decide: Callable[[RequestInfo], int] = field(repr=False, compare=False)
    outcomes: tuple[int, ...] = field(repr=False, compare=False)
    # What a decision is a function of, so a caller may remember it: MEMO_NONE (other fields of
    # the request: host, headers, method, source IP, body), MEMO_URL (the request target as sent:
    # every live rule matches on the URL without the Host) or MEMO_HOST_URL (Host and target).
    memo_by: int = 0
    source: str = field(repr=False, compare=False, default="")  # the generated code, to read

    def route_with_rule(self, req: RequestInfo) -> tuple[int, int]:
        """(route(req), index in rule_names of the deciding rule or NO_MATCH), for hit counters."""
        i = self.decide(req)
        return self.outcomes[i], (i if i < len(self.rule_names) else NO_MATCH)


def compile_router(vs: VirtualService, rules: Mapping[str, ContentRule], *,
                   tuning: Tuning = DEFAULT_TUNING) -> Router:
    """Compile `vs`'s rules (named in `rule_order(vs)`, defined in `rules`) into a Router.
    `tuning` only changes how fast it is, never an answer (tests use it)."""
    # pace(): each step walks every rule (milliseconds at 10,000; see runtime.off_loop).
    order = rule_order(vs)
    pace()
    subvs_index = {s.name: i for i, s in enumerate(vs.subvs)}
    problems = [ConfigProblem(f"vs {vs.name!r}", f"unknown content rule {rn!r}")
                for rn, _ in order if rn != DEFAULT_RULE and rn not in rules]
    problems += [ConfigProblem(f"vs {vs.name!r}", f"unknown SubVS {sn!r}")
                 for _, sn in order if sn not in subvs_index]
    if problems:
        raise ConfigError(problems)
    pace()
    ordered = [None if rn == DEFAULT_RULE else rules[rn] for rn, _ in order]
    outcomes = (*(REFUSE if r is not None and r.fail_on_match else subvs_index[sn]
                  for r, (_, sn) in zip(ordered, order, strict=True)), NO_MATCH)
    pace()
    compiled = compile_rules(ordered, outcomes, tuning)
    pace()
    return Router(
        subvs_names=tuple(s.name for s in vs.subvs),
        rule_names=tuple(rn for rn, _ in order),
        needs_body=needs_body(ordered),
        route=compiled.route,
        decide=compiled.first,
        outcomes=outcomes,
        memo_by=_memo_by(ordered),
        source=compiled.source,
    )


def _memo_by(rules: list[ContentRule | None]) -> int:
    """MEMO_URL when every rule that can run (up to `default`) matches on the URL alone, so that
    the decision is a function of the request target; MEMO_HOST_URL when some also take the Host
    in; MEMO_NONE when any looks at something else."""
    memo = MEMO_URL
    for r in rules:
        if r is None:
            break
        if r.on is not MatchOn.URL:
            return MEMO_NONE
        if r.include_host:
            memo = MEMO_HOST_URL
    return memo
