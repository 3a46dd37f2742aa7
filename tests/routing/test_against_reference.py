"""The compiled router agrees with the one-rule-at-a-time reference on random rules and requests."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.config.model import ContentRule, MatchOn, MatchType
from lbproxy.routing import compile_router

from .reference import FakeRequest, make_vs, reference_route

# A small alphabet makes prefixes, suffixes and keys collide often; the odd characters probe case
# folding ("\u017f" long s and "\u212a" Kelvin sign fold to ASCII under re.IGNORECASE only; "\u0130"
# lowercases to two characters) and `$` before a final newline.
CHARS = "aAbB/.:-\n\u017f\u212a\u0130\u00e9"
text = st.text(alphabet=CHARS, max_size=6)

ATOMS = ["a", "A", "b", "/", r"\.", ".", "a?", "[ab]", "b+", r"\d", "(a|b)", "(?:/b)", "\u017f",
         "\u212a", "\n", ":", r"\w", "[^a]"]
def regex_from(v: int) -> str:
    """A valid regex decoded from one integer (one hypothesis draw; 0 decodes to the empty one)."""
    v, flags = divmod(v, 6)
    v, start = divmod(v, 3)
    v, end = divmod(v, 3)
    v, count = divmod(v, 5)
    atoms = []
    for _ in range(count):
        v, atom = divmod(v, len(ATOMS))
        atoms.append(ATOMS[atom])
    return (["", "(?i)", "(?m)", "(?s)", "", ""][flags] + ["", "^", r"\A"][start]
            + "".join(atoms) + ["", "$", r"\Z"][end])


regexes = st.integers(0, 6 * 3 * 3 * 5 * len(ATOMS) ** 4).map(regex_from)


ONS = [MatchOn.URL, MatchOn.URL, MatchOn.URL, MatchOn.HOST, MatchOn.METHOD, MatchOn.SRC_IP,
       MatchOn.HEADER, MatchOn.BODY]
FLAGS = [0, 0, 0, 1, 2, 0, 1, 0]
# One integer holds all of a rule's options (hypothesis draws are the cost of this test; an
# integer still shrinks towards "no options").
rule_bits = st.integers(0, (1 << 24) - 1)


def bits(value: int, start: int, width: int) -> int:
    return (value >> start) & ((1 << width) - 1)


@st.composite
def rules(draw: st.DrawFn, name: str) -> ContentRule:
    v = draw(rule_bits)
    match_type = list(MatchType)[bits(v, 0, 2) % 3]
    pattern = draw(regexes if match_type is MatchType.REGEX else text)
    on = ONS[bits(v, 2, 3)]
    url = on is MatchOn.URL
    return ContentRule(
        name=name, match_type=match_type, pattern=pattern, on=on,
        header=["x-a", "X-A", "x-b", "x-a"][bits(v, 5, 2)] if on is MatchOn.HEADER else "",
        negate=bool(bits(v, 7, 1)), ignore_case=bool(bits(v, 8, 1)),
        include_host=url and bool(bits(v, 9, 1)), include_query=url and bool(bits(v, 10, 1)),
        fail_on_match=bits(v, 11, 3) == 1, set_flag=FLAGS[bits(v, 14, 3)],
        only_if_flag=FLAGS[bits(v, 17, 3)], only_if_not_flag=FLAGS[bits(v, 20, 3)])


HOSTS = ["a.b", "a", "b.a", "[::1]", "x", "a.b:80", "[::1]:80", "a:", "x"]


@st.composite
def requests(draw: st.DrawFn) -> FakeRequest:
    v = draw(rule_bits)
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


owners = st.sampled_from(["s0", "s1", "s2"])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[object, dict[str, ContentRule], list[FakeRequest]]:
    count = draw(st.integers(0, 24))
    defined = {f"r{i}": draw(rules(f"r{i}")) for i in range(count)}
    names = list(defined)
    if draw(st.booleans()):
        names.insert(draw(st.integers(0, len(names))), "default")
    subvs: dict[str, list[str]] = {"s0": [], "s1": [], "s2": []}
    for rn in names:
        subvs[draw(owners)].append(rn)
    precedence = tuple(draw(st.permutations(names))) if draw(st.booleans()) else ()
    vs = make_vs(subvs, precedence)
    return vs, defined, draw(st.lists(requests(), min_size=1, max_size=12))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_router_agrees_with_reference(
        scenario: tuple[object, dict[str, ContentRule], list[FakeRequest]]) -> None:
    vs, defined, reqs = scenario
    router = compile_router(vs, defined)  # type: ignore[arg-type]
    for req in reqs:
        want = reference_route(vs, defined, req)  # type: ignore[arg-type]
        assert router.route_with_rule(req) == want, req
        assert router.route(req) == want[0]
