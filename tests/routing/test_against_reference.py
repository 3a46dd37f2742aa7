"""The compiled router agrees with the one-rule-at-a-time reference on random rules and requests."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.config.model import ContentRule, MatchOn, MatchType, VirtualService, rule_order
from lbproxy.routing import MEMO_HOST_URL, MEMO_NONE, MEMO_URL, Tuning, compile_router

from .reference import FakeRequest, make_vs, reference_route

# A small alphabet makes prefixes, suffixes and keys collide often. The odd characters probe case
# folding: "\u017f" (long s) and "\u212a" (Kelvin sign) fold to "s" and "k" under re.IGNORECASE but
# not under str.lower, "\u0130" lowercases to two characters; "\n" probes `$`.
CHARS = "aAbsk/.:\n\u017f\u212a\u0130\u00e9"
text = st.text(alphabet=CHARS, max_size=6)
# Patterns are never empty (the loader refuses that; "" would also shadow every later rule).
pattern_text = st.text(alphabet=CHARS, min_size=1, max_size=5)

# Regex building blocks, each with a string it matches (to aim requests at rules).
ATOMS = {"a": "a", "A": "A", "b": "b", "s": "s", "k": "K", "/": "/", r"\.": ".", ".": "x",
         "a?": "a", "[ab]": "b", "b+": "bb", r"\d": "1", "(a|b)": "a", "(?:/b)": "/b",
         "\u017f": "\u017f", "\u212a": "k", "\n": "\n", ":": ":", r"\w": "w", "[^a]": "b"}
ATOM_LIST = list(ATOMS)
ATOM_RE = re.compile("|".join(re.escape(a) for a in sorted(ATOMS, key=len, reverse=True)))
FLAGS = ["", "(?i)", "(?m)", "(?s)", "", ""]
STARTS = ["", "^", r"\A"]
ENDS = ["", "$", r"\Z"]


def regex_from(v: int) -> str:
    """A valid regex decoded from one integer (one hypothesis draw; 0 decodes to "a")."""
    v, flags = divmod(v, len(FLAGS))
    v, start = divmod(v, len(STARTS))
    v, end = divmod(v, len(ENDS))
    v, count = divmod(v, 4)
    atoms = []
    for _ in range(count + 1):
        v, atom = divmod(v, len(ATOM_LIST))
        atoms.append(ATOM_LIST[atom])
    return FLAGS[flags] + STARTS[start] + "".join(atoms) + ENDS[end]


def sample_for(rule: ContentRule) -> str:
    """A subject the rule's pattern matches (roughly: anchors and case aside)."""
    if rule.match_type is not MatchType.REGEX:
        return rule.pattern
    p = rule.pattern
    for f in FLAGS[1:4]:
        p = p.removeprefix(f)
    p = p.removeprefix("^").removeprefix(r"\A").removesuffix(r"\Z")
    if p.endswith("$") and not p.endswith(r"\$"):
        p = p[:-1]
    return "".join(ATOMS[a] for a in ATOM_RE.findall(p))


# Ways to bend a sample: exact, "$" before a final newline, case changes, extra text around it,
# re-only case folds, line breaks around it (multiline `^` and `$`), one character short.
BENDS: list[Callable[[str], str]] = [
    lambda s: s, lambda s: s + "\n", str.upper, str.lower, lambda s: "x" + s, lambda s: s + "x",
    lambda s: s.replace("s", "\u017f").replace("k", "\u212a").replace("K", "\u212a"),
    lambda s: "x\n" + s, lambda s: s + "\nx", lambda s: s[:-1], lambda s: s.upper() + "\n",
]

regexes = st.integers(0, len(FLAGS) * len(STARTS) * len(ENDS) * 4 * len(ATOM_LIST) ** 4
                      ).map(regex_from)
ONS = [MatchOn.URL, MatchOn.URL, MatchOn.URL, MatchOn.HOST, MatchOn.METHOD, MatchOn.SRC_IP,
       MatchOn.HEADER, MatchOn.BODY]
FLAG_NUMBERS = [0, 0, 0, 1, 2, 0, 1, 0]
HOSTS = ["a.b", "a", "b.a", "[::1]", "x", "a.b:80", "[::1]:80", "a:", "x"]
# One integer holds all of a rule's or a request's choices: hypothesis draws are what this test
# spends its time on, and an integer still shrinks towards "nothing special".
choices = st.integers(0, (1 << 26) - 1)


def bits(value: int, start: int, width: int) -> int:
    return (value >> start) & ((1 << width) - 1)


@st.composite
def rules(draw: st.DrawFn, name: str) -> ContentRule:
    v = draw(choices)
    match_type = list(MatchType)[bits(v, 0, 2) % 3]
    pattern = draw(regexes if match_type is MatchType.REGEX else pattern_text)
    on = ONS[bits(v, 2, 3)]
    url = on is MatchOn.URL
    return ContentRule(
        name=name, match_type=match_type, pattern=pattern, on=on,
        header=["x-a", "X-A", "x-b", "x-a"][bits(v, 5, 2)] if on is MatchOn.HEADER else "",
        # Rarely negated: a negated rule matches almost anything and would hide the rules after it.
        negate=bits(v, 23, 3) == 1, ignore_case=bool(bits(v, 8, 1)),
        include_host=url and bool(bits(v, 9, 1)), include_query=url and bool(bits(v, 10, 1)),
        fail_on_match=bits(v, 11, 3) == 1, set_flag=FLAG_NUMBERS[bits(v, 14, 3)],
        only_if_flag=FLAG_NUMBERS[bits(v, 17, 3)],
        only_if_not_flag=FLAG_NUMBERS[bits(v, 20, 3)])


@st.composite
def random_requests(draw: st.DrawFn) -> FakeRequest:
    v = draw(choices)
    body = draw(text).encode() if bits(v, 0, 1) else draw(st.binary(max_size=4))
    headers = {}
    if bits(v, 1, 1):
        headers["x-a"] = draw(text)
    if bits(v, 2, 1):
        headers["x-b"] = draw(text)
    return FakeRequest(
        method=["GET", "POST", "get", "GET"][bits(v, 3, 2)],
        path="/" + draw(text), query=["", "", "a", "b=A"][bits(v, 5, 2)],
        host=HOSTS[bits(v, 7, 4) % len(HOSTS)],
        src_ip=["192.0.2.1", "::1", "a", "192.0.2.1"][bits(v, 11, 2)],
        body=body, headers=headers)


def aimed_request(rule: ContentRule, v: int) -> FakeRequest:
    """A request whose subject for `rule` is a bent sample of the rule's pattern."""
    s = BENDS[v % len(BENDS)](sample_for(rule))
    if rule.on is MatchOn.URL:
        return FakeRequest(path=s, host="" if rule.include_host else "a.b")
    if rule.on is MatchOn.HOST:
        return FakeRequest(host=s.lower())
    if rule.on is MatchOn.METHOD:
        return FakeRequest(method=s)
    if rule.on is MatchOn.SRC_IP:
        return FakeRequest(src_ip=s)
    if rule.on is MatchOn.HEADER:
        return FakeRequest(headers={rule.header.lower(): s})
    return FakeRequest(body=s.encode())


Scenario = tuple[VirtualService, dict[str, ContentRule], list[FakeRequest]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    count = draw(st.integers(0, 24))
    defined = {f"r{i}": draw(rules(f"r{i}")) for i in range(count)}
    names = list(defined)
    if draw(st.booleans()):
        names.insert(draw(st.integers(0, len(names))), "default")
    subvs: dict[str, list[str]] = {"s0": [], "s1": [], "s2": []}
    for rn in names:
        subvs[["s0", "s1", "s2"][draw(st.integers(0, 2))]].append(rn)
    precedence = tuple(draw(st.permutations(names))) if draw(st.booleans()) else ()
    vs = make_vs(subvs, precedence)
    reqs = draw(st.lists(random_requests(), min_size=1, max_size=4))
    # Aim two requests at every rule; their bends come from one draw (draws are the cost here).
    v = draw(choices)
    for i, rule in enumerate(defined.values()):
        reqs.append(aimed_request(rule, v + i))
        reqs.append(aimed_request(rule, 3 * v + 7 * i + 1))
    return vs, defined, reqs


def tuning_from(v: int) -> Tuning:
    """Thresholds decoded from one integer, from "every shortcut" to "none": the same rules then
    compile into tries instead of startswith chains, set instead of tuple prefilters, combined
    regexes instead of single ones, loops instead of inline code."""
    v, small = divmod(v, 3)
    v, filter_from = divmod(v, 3)
    v, head = divmod(v, 3)
    v, few = divmod(v, 3)
    v, combine = divmod(v, 4)
    v, inline = divmod(v, 2)
    v, scan = divmod(v, 3)
    return Tuning(small=[0, 1, 4][small], filter_from=[0, 3, 100][filter_from],
                  head=[1, 2, 4][head], few_heads=[0, 1, 8][few],
                  combine_from=[1, 2, 3, 100][combine], inline_free=[0, 8][inline],
                  scan_from=[1, 4, 1000][scan])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 3 ** 5 * 4 * 2 - 1).map(tuning_from))
def test_router_agrees_with_reference(scenario: Scenario, tuning: Tuning) -> None:
    vs, defined, reqs = scenario
    routers = [compile_router(vs, defined), compile_router(vs, defined, tuning=tuning)]
    for req in reqs:
        want = reference_route(vs, defined, req)
        for router in routers:
            assert router.route_with_rule(req) == want, (req, router.source)
            assert router.route(req) == want[0]


OTHER_SIDES = [
    {"method": "POST", "src_ip": "::1", "body": b"ab", "headers": {"x-a": "a", "x-b": "b"}},
    {"method": "get", "src_ip": "a", "body": b"", "headers": {}},
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.booleans())
def test_memo_by_names_all_a_decision_depends_on(scenario: Scenario, all_url: bool) -> None:
    """A data plane remembers decisions by request target (and Host for MEMO_HOST_URL): whatever
    else changes in the request, the router decides the same."""
    vs, defined, reqs = scenario
    if all_url:  # else rule sets on the URL alone are rare
        defined = {n: replace(r, on=MatchOn.URL, header="") for n, r in defined.items()}
        reqs = reqs + [aimed_request(r, i) for i, r in enumerate(defined.values())]
    router = compile_router(vs, defined)
    live = []
    for rn, _ in rule_order(vs):
        if rn == "default":
            break
        live.append(defined[rn])
    ons = {r.on for r in live}
    if ons - {MatchOn.URL}:
        assert router.memo_by == MEMO_NONE
        return
    want = MEMO_HOST_URL if any(r.include_host for r in live) else MEMO_URL
    assert router.memo_by == want
    for req in reqs:
        decided = router.decide(req)
        for other in OTHER_SIDES:
            hosts = [req.host] if want == MEMO_HOST_URL else HOSTS
            for host in hosts:
                bent = FakeRequest(path=req.path, query=req.query, host=host, **other)
                assert router.decide(bent) == decided, (req, bent, router.source)


def test_samples_hit_their_rules() -> None:
    """The aimed requests really reach the rules they aim at (else the test above is weak)."""
    assert regex_from(0) == "a"
    hits = 0
    for v in range(2000):
        r = ContentRule("r", MatchType.REGEX, regex_from(v * 7919))
        vs = make_vs({"s": ["r"]})
        if reference_route(vs, {"r": r}, aimed_request(r, 0))[0] == 0:
            hits += 1
    assert hits > 1500
