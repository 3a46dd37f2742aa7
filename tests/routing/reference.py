"""The content-rule semantics written as plainly as possible: one rule at a time, in order.

Tests compare the compiled router with this interpreter; it shares no code with lbproxy.routing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lbproxy.config.model import (
    Address,
    ContentRule,
    MatchOn,
    MatchType,
    SubVS,
    VirtualService,
    rule_order,
)

NO_MATCH = -1
REFUSE = -2


@dataclass(frozen=True)
class FakeRequest:
    """Satisfies lbproxy.routing.RequestInfo."""

    method: str = "GET"
    path: str = "/"
    query: str = ""
    host: str = "example.com"
    src_ip: str = "192.0.2.1"
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


def make_vs(subvs: Mapping[str, list[str]], precedence: tuple[str, ...] = ()) -> VirtualService:
    """A content-switching VS with SubVSs named by `subvs` holding the listed rule names."""
    return VirtualService(
        name="vs", listen=Address("127.0.0.1", 80), content_switching=True,
        subvs=tuple(SubVS(name=n, rules=tuple(rs)) for n, rs in subvs.items()),
        precedence=precedence)


def subject(rule: ContentRule, req: FakeRequest) -> str:
    if rule.on == MatchOn.URL:
        s = req.path
        if rule.include_query and req.query != "":
            s = s + "?" + req.query
        if rule.include_host:
            s = req.host + s
        return s
    if rule.on == MatchOn.HOST:
        if req.host.startswith("[") and "]" in req.host:
            return req.host[: req.host.index("]") + 1]
        return req.host.split(":")[0]
    if rule.on == MatchOn.METHOD:
        return req.method
    if rule.on == MatchOn.SRC_IP:
        return req.src_ip
    if rule.on == MatchOn.HEADER:
        return req.header(rule.header.lower())
    return req.body[: 50 * 1024].decode("utf-8", "surrogateescape")


@functools.cache  # re's own cache holds 512 patterns; the 1024-rule tests need more
def _compiled(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def pattern_matches(rule: ContentRule, s: str) -> bool:
    if rule.match_type == MatchType.REGEX:
        return _compiled(rule.pattern, rule.ignore_case).search(s) is not None
    p = rule.pattern
    if rule.ignore_case:
        s, p = s.lower(), p.lower()
    if rule.match_type == MatchType.PREFIX:
        return s.startswith(p)
    return s.endswith(p)


def reference_route(vs: VirtualService, rules: Mapping[str, ContentRule],
                    req: FakeRequest) -> tuple[int, int]:
    """(SubVS index | NO_MATCH | REFUSE, index of the deciding rule in precedence order or -1)."""
    names = [s.name for s in vs.subvs]
    flags: set[int] = set()
    for i, (rule_name, subvs_name) in enumerate(rule_order(vs)):
        if rule_name == "default":
            return names.index(subvs_name), i
        rule = rules[rule_name]
        if rule.only_if_flag != 0 and rule.only_if_flag not in flags:
            continue
        if rule.only_if_not_flag != 0 and rule.only_if_not_flag in flags:
            continue
        matched = pattern_matches(rule, subject(rule, req))
        if rule.negate:
            matched = not matched
        if not matched:
            continue
        if rule.set_flag != 0:
            flags.add(rule.set_flag)
            continue
        if rule.fail_on_match:
            return REFUSE, i
        return names.index(subvs_name), i
    return NO_MATCH, -1
