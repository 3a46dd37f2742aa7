"""What a content rule looks at in a request, and whether one rule's pattern matches it.

`RequestInfo` is the seam to the data plane. `subject_for` extracts a rule's subject text and
`predicate` matches one rule's pattern against it: together they are the one-rule-at-a-time
meaning of a rule, which the compiled router must agree with (and falls back to in rare cases).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from ..config.model import BODY_MATCH_LIMIT, ContentRule, MatchOn, MatchType


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
# Rules that look at the same text share a key: ("url", include_host, include_query),
# ("host",), ("method",), ("src-ip",), ("header", lowercase name), ("body",).
SubjectKey = tuple[str, ...]


def hostname(host: str) -> str:
    """The Host header without its port: "a.example:8080" -> "a.example", "[::1]:80" -> "[::1]"."""
    if host.startswith("["):
        end = host.find("]")
        return host if end < 0 else host[:end + 1]
    colon = host.find(":")
    return host if colon < 0 else host[:colon]


def body_text(req: RequestInfo) -> str:
    """The body as rules see it: the first 50 KiB, UTF-8 with undecodable bytes kept apart."""
    return bytes(req.body[:BODY_MATCH_LIMIT]).decode("utf-8", "surrogateescape")


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


_URL: dict[tuple[bool, bool], Subject] = {
    (False, False): _url, (False, True): _url_query,
    (True, False): _url_host, (True, True): _url_host_query,
}
_OTHER: dict[MatchOn, Subject] = {MatchOn.HOST: _host, MatchOn.METHOD: _method,
                                  MatchOn.SRC_IP: _src_ip, MatchOn.BODY: body_text}


def subject_key(rule: ContentRule) -> SubjectKey:
    if rule.on is MatchOn.URL:
        return ("url", str(rule.include_host), str(rule.include_query))
    if rule.on is MatchOn.HEADER:
        return ("header", rule.header.lower())
    return (rule.on.value,)


def subject_for(rule: ContentRule) -> tuple[SubjectKey, Subject]:
    """(the rule's subject key, the function extracting its subject from a request)."""
    key = subject_key(rule)
    if rule.on is MatchOn.URL:
        return key, _URL[(rule.include_host, rule.include_query)]
    if rule.on is MatchOn.HEADER:
        name = key[1]

        def header(req: RequestInfo) -> str:
            return req.header(name)

        return key, header
    return key, _OTHER[rule.on]


def predicate(rule: ContentRule) -> Callable[[str], bool]:
    """Does a subject match the rule's pattern (before negation)?"""
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
