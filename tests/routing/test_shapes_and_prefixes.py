"""The regex shape analysis and the longest-prefix lookup the router is built from."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.routing import prefixes
from lbproxy.routing.prefixes import prefix_lookup, trie_regex
from lbproxy.routing.shapes import RegexShape, Shape, analyze, factor

ACME = r"^example\.com(:\d+)?/\.well-known/acme-challenge/abc_-1$"


@pytest.mark.parametrize(("pattern", "flags", "shape"), [
    (r"^/api", 0, RegexShape(Shape.PREFIX, "/api")),
    (r"\A/api", 0, RegexShape(Shape.PREFIX, "/api")),
    (r"\.png$", 0, RegexShape(Shape.SUFFIX, ".png", newline_end=True)),
    (r"\.png\Z", 0, RegexShape(Shape.SUFFIX, ".png")),
    (r"^www\.a\.com$", 0, RegexShape(Shape.EXACT, "www.a.com", newline_end=True)),
    (r"^/api/v\d+/", 0, RegexShape(Shape.HAS_PREFIX, "/api/v")),
    (r"^/ab?", 0, RegexShape(Shape.HAS_PREFIX, "/a")),
    (r"/x/\d+\.json$", 0, RegexShape(Shape.HAS_SUFFIX, ".json", newline_end=True)),
    (ACME, 0, RegexShape(Shape.HAS_SUFFIX, "/.well-known/acme-challenge/abc_-1",
                         newline_end=True)),
    (r"^/API", re.IGNORECASE, RegexShape(Shape.PREFIX, "/api", folded=True)),
    (r"(?i)^/API", 0, RegexShape(Shape.PREFIX, "/api", folded=True)),
    (r"(?i)^a\u017fb", 0, RegexShape(Shape.HAS_PREFIX, "a", folded=True)),  # long s: not ASCII
    (r"^a\u017fb", 0, RegexShape(Shape.PREFIX, "a\u017fb")),
    (r"(?m)^a", 0, RegexShape(Shape.FREE, "a")),  # ^ after any newline; "a" is still needed
    (r"(?m)a$", 0, RegexShape(Shape.FREE, "a")),
    (r"(?m)\Aa\Z", 0, RegexShape(Shape.EXACT, "a")),
    (r"(?x) ^ a b \Z", 0, RegexShape(Shape.EXACT, "ab")),
    (r"^a|^b", 0, RegexShape(Shape.FREE)),
    (r"^ab|^ac", 0, RegexShape(Shape.HAS_PREFIX, "a")),  # re factors the common prefix out
    (r"^(a)", 0, RegexShape(Shape.FREE)),
    (r"^a*", 0, RegexShape(Shape.FREE)),
    (r"/api", 0, RegexShape(Shape.FREE, "/api")),
    (r"/it\d+/(ab|cd)\.json", 0, RegexShape(Shape.FREE, ".json")),  # the longest run
    (r"(?i)x/API/", 0, RegexShape(Shape.FREE, "x/api/", folded=True)),
    (r"a|bcd", 0, RegexShape(Shape.FREE)),  # nothing is required of every match
    (r"^", 0, RegexShape(Shape.PREFIX, "")),
    (r"^$", 0, RegexShape(Shape.EXACT, "", newline_end=True)),
])
def test_analyze(pattern: str, flags: int, shape: RegexShape) -> None:
    assert dataclasses.replace(analyze(pattern, flags), combinable=False) == shape


@pytest.mark.parametrize(("pattern", "flags", "combinable"), [
    (r"^/api/v\d+/", 0, True),
    (r"^/api/(en|de)/", 0, True),  # `|` inside a group: fine, alternatives are wrapped
    (r"^/api/v\d+/", re.IGNORECASE, True),
    (r"(?i)^/api/v\d+/", 0, False),  # a global flag must lead the whole combined pattern
    (r"(?i)^/api/v\d+/", re.IGNORECASE, False),  # ... even when it changes nothing
    (r"(?u)^/api", 0, False),
    (r"^/(a)\1", 0, False),  # group numbers shift
    (r"^/(?P<x>a)", 0, False),  # names would clash
    (r"^/(?P<x>a)(?P=x)", 0, False),
    (r"^/(a)?(?(1)b|c)", 0, False),
    (r"^/(?<=/)a", 0, False),  # conservative
])
def test_combinable(pattern: str, flags: int, combinable: bool) -> None:
    assert analyze(pattern, flags).combinable is combinable


KEYS = st.sets(st.text(alphabet="ab/.", max_size=5), max_size=30)


@settings(max_examples=150, deadline=None)
@given(KEYS, st.lists(st.text(alphabet="ab/.c", max_size=7), max_size=10))
def test_prefix_lookup_finds_the_longest_key(keys: set[str], subjects: list[str]) -> None:
    look = prefix_lookup({k: k for k in keys}, None)
    for s in subjects:
        want = max((k for k in keys if s.startswith(k)), key=len, default=None)
        assert look(s) == want


def test_trie_regex_shape() -> None:
    assert trie_regex(["/api", "/api/v1", "/static"]) == r"/(?:api(?:/v1|)|static)"
    assert re.fullmatch(trie_regex(["a", "ab", "abc"]), "abc")


DEEP = {"a" * n + "b" for n in range(250)} | {"a" * n for n in range(1, 250)}


def check_deep(look: object) -> None:
    assert callable(look)
    assert look("a" * 10 + "b" + "zz") == 11
    assert look("a" * 300) == 249
    assert look("zz") == -1


def test_prefix_lookup_of_a_deep_trie() -> None:
    # 250 nested groups (the pattern length limit): re copes today.
    check_deep(prefix_lookup({k: len(k) for k in DEEP}, -1))


def test_prefix_lookup_falls_back_when_re_gives_up(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(prefixes, "trie_regex", lambda keys: "(" * 300)  # re.error
    check_deep(prefix_lookup({k: len(k) for k in DEEP}, -1))
    assert "slower lookup" in caplog.text


def test_small_sets_use_startswith(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(keys: object) -> str:
        raise AssertionError("no regex for a handful of keys")

    monkeypatch.setattr(prefixes, "trie_regex", boom)
    look = prefix_lookup({"/a": 1, "/ab": 2}, 0)
    assert (look("/abc"), look("/ax"), look("/b")) == (2, 1, 0)


@pytest.mark.parametrize(("patterns", "factored"), [
    ([r"^/api/v\d+/cart/", r"^/api/v\d+/shop/"], r"^/api/v\d+/(?:(?:cart/)|(?:shop/))"),
    ([r"^/a{2,3}x", r"^/a{2,4}y"], r"^/(?:(?:a{2,3}x)|(?:a{2,4}y))"),  # not inside {m,n}
    ([r"^/ab?", r"^/ab"], r"^/a(?:(?:b?)|(?:b))"),  # not between an atom and its quantifier
    ([r"^/x\.y", r"^/x\.z"], r"^/x\.(?:(?:y)|(?:z))"),
    ([r"^/[ab]c", r"^/[ab]d"], r"^/[ab](?:(?:c)|(?:d))"),
    ([r"^/[ab]c", r"^/[ac]d"], r"^/(?:(?:[ab]c)|(?:[ac]d))"),  # not inside a class
    ([r"^ab|^ac", r"^ad"], None),  # a top-level | is no clean cut
    ([r"^/a"], None),
])
def test_factor(patterns: list[str], factored: str | None) -> None:
    assert factor(patterns) == factored


FACTOR_ATOMS = ["a", "b", "/", r"\.", ".", "a?", "b*", "[ab]", "(a|b)", r"\d", "{2}", "|", "^",
                "(", ")"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(FACTOR_ATOMS), max_size=6).map("".join),
                min_size=2, max_size=4),
       st.lists(st.text(alphabet="ab/.1", max_size=6), min_size=1, max_size=6))
def test_factor_matches_iff_one_pattern_does(patterns: list[str], subjects: list[str]) -> None:
    valid = []
    for p in patterns:
        try:
            re.compile(p)
        except re.error:
            continue
        valid.append(p)
    factored = factor(valid)
    if factored is None:
        return
    rx = re.compile(factored)
    for s in subjects:
        assert (rx.match(s) is not None) == any(re.match(p, s) for p in valid), (factored, s)
