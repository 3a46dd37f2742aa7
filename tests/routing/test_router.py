"""Table-driven tests of every content-rule option, each also checked against the reference."""

from __future__ import annotations

from typing import Any

import pytest

from lbproxy.config.model import BODY_MATCH_LIMIT, ContentRule, MatchOn, MatchType
from lbproxy.errors import ConfigError
from lbproxy.routing import NO_MATCH, REFUSE, Router, Tuning, compile_router

from .reference import FakeRequest, make_vs, reference_route

PREFIX, POSTFIX, REGEX = MatchType.PREFIX, MatchType.POSTFIX, MatchType.REGEX
URL, HOST, METHOD, SRC_IP, HEADER, BODY = (MatchOn.URL, MatchOn.HOST, MatchOn.METHOD,
                                           MatchOn.SRC_IP, MatchOn.HEADER, MatchOn.BODY)


def rule(name: str, match_type: MatchType, pattern: str, **kw: Any) -> ContentRule:
    return ContentRule(name=name, match_type=match_type, pattern=pattern, **kw)


def router_for(rules: list[ContentRule], *, default: bool = False,
               precedence: tuple[str, ...] = ()) -> tuple[Router, Any]:
    """One SubVS per rule (SubVS i holds rule i), plus SubVS "dflt" with `default` at the end."""
    subvs = {f"s{i}": [r.name] for i, r in enumerate(rules)}
    if default:
        subvs["dflt"] = ["default"]
    vs = make_vs(subvs, precedence)
    return compile_router(vs, {r.name: r for r in rules}), vs


# Thresholds at both extremes: every table a trie with a set prefilter, every regex combined or
# looped; and no shortcut at all.
EAGER = Tuning(small=0, filter_from=0, head=2, few_heads=0, combine_from=1, inline_free=0,
               scan_from=1)
LAZY = Tuning(small=1000, filter_from=1000, combine_from=1000, inline_free=1000, scan_from=1000)


def route(rules: list[ContentRule], req: FakeRequest, **kw: Any) -> int:
    router, vs = router_for(rules, **kw)
    got = router.route(req)
    want = reference_route(vs, {r.name: r for r in rules}, req)
    assert router.route_with_rule(req) == want
    for tuning in (EAGER, LAZY):
        other = compile_router(vs, {r.name: r for r in rules}, tuning=tuning)
        assert other.route_with_rule(req) == want, tuning
    return got


def matches(r: ContentRule, req: FakeRequest) -> bool:
    return route([r], req) == 0


# (rule options, request fields, matches?)
CASES: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    # --- url: the path as sent, without the query
    (dict(match_type=PREFIX, pattern="/api"), dict(path="/api/x"), True),
    (dict(match_type=PREFIX, pattern="/api"), dict(path="/ap"), False),
    (dict(match_type=PREFIX, pattern="/api"), dict(path="/API/x"), False),
    (dict(match_type=PREFIX, pattern="/a%20b"), dict(path="/a%20b/c"), True),
    (dict(match_type=PREFIX, pattern="/a b"), dict(path="/a%20b/c"), False),
    (dict(match_type=POSTFIX, pattern=".png"), dict(path="/a/b.png", query="v=1"), True),
    (dict(match_type=POSTFIX, pattern=".png"), dict(path="/a/b.png.gz"), False),
    (dict(match_type=REGEX, pattern=r"^/u/\d+$"), dict(path="/u/12"), True),
    (dict(match_type=REGEX, pattern=r"^/u/\d+$"), dict(path="/u/12/x"), False),
    (dict(match_type=REGEX, pattern=r"/u/"), dict(path="/a/u/b"), True),  # search, not match
    (dict(match_type=REGEX, pattern=r"v=1"), dict(path="/a", query="v=1"), False),
    # --- include_query: path + "?" + query, only when there is a query
    (dict(match_type=POSTFIX, pattern="=1", include_query=True), dict(path="/x", query="a=1"),
     True),
    (dict(match_type=POSTFIX, pattern="=1"), dict(path="/x", query="a=1"), False),
    (dict(match_type=REGEX, pattern=r"^/x\?a=1$", include_query=True),
     dict(path="/x", query="a=1"), True),
    (dict(match_type=POSTFIX, pattern="?", include_query=True), dict(path="/x", query=""), False),
    # --- include_host: the Host header as sent (with its port) in front
    (dict(match_type=PREFIX, pattern="example.com:8080/a", include_host=True),
     dict(host="example.com:8080", path="/a/b"), True),
    (dict(match_type=PREFIX, pattern="example.com:8080/a", include_host=True),
     dict(host="example.com", path="/a/b"), False),
    (dict(match_type=PREFIX, pattern="/a", include_host=True), dict(path="/a/b"), False),
    (dict(match_type=REGEX, pattern=r"^a\.b/x\?q$", include_host=True, include_query=True),
     dict(host="a.b", path="/x", query="q"), True),
    # --- host: without the port, lowercased by the data plane
    (dict(match_type=PREFIX, pattern="www.", on=HOST), dict(host="www.example.com:8080"), True),
    (dict(match_type=POSTFIX, pattern=".example.com", on=HOST), dict(host="a.example.com:443"),
     True),
    (dict(match_type=POSTFIX, pattern=".example.com", on=HOST), dict(host="example.com"), False),
    (dict(match_type=REGEX, pattern=r"^example\.com$", on=HOST), dict(host="example.com:80"),
     True),
    (dict(match_type=REGEX, pattern=r"^\[::1\]$", on=HOST), dict(host="[::1]:80"), True),
    (dict(match_type=POSTFIX, pattern=":80", on=HOST), dict(host="a.b:80"), False),
    # --- method
    (dict(match_type=PREFIX, pattern="PO", on=METHOD), dict(method="POST"), True),
    (dict(match_type=POSTFIX, pattern="ST", on=METHOD), dict(method="POST"), True),
    (dict(match_type=REGEX, pattern="^(GET|HEAD)$", on=METHOD), dict(method="HEAD"), True),
    (dict(match_type=REGEX, pattern="^(GET|HEAD)$", on=METHOD), dict(method="GETX"), False),
    # --- src-ip
    (dict(match_type=PREFIX, pattern="10.1.", on=SRC_IP), dict(src_ip="10.1.2.3"), True),
    (dict(match_type=PREFIX, pattern="10.1.", on=SRC_IP), dict(src_ip="10.10.2.3"), False),
    (dict(match_type=POSTFIX, pattern=".3", on=SRC_IP), dict(src_ip="10.1.2.3"), True),
    (dict(match_type=REGEX, pattern=r"^192\.0\.2\.\d+$", on=SRC_IP), dict(src_ip="192.0.2.7"),
     True),
    (dict(match_type=PREFIX, pattern="2001:db8:", on=SRC_IP), dict(src_ip="2001:db8::1"), True),
    # --- header: named case-insensitively, values joined with ", ", missing = ""
    (dict(match_type=PREFIX, pattern="curl/", on=HEADER, header="User-Agent"),
     dict(headers={"user-agent": "curl/8.0"}), True),
    (dict(match_type=PREFIX, pattern="curl/", on=HEADER, header="user-agent"),
     dict(headers={"x-agent": "curl/8.0"}), False),
    (dict(match_type=POSTFIX, pattern=", b", on=HEADER, header="accept"),
     dict(headers={"accept": "a, b"}), True),
    (dict(match_type=REGEX, pattern="^$", on=HEADER, header="x-missing"), dict(), True),
    (dict(match_type=PREFIX, pattern="x", on=HEADER, header="x-missing", negate=True), dict(),
     True),
    # --- body: the first 50 KiB
    (dict(match_type=PREFIX, pattern='{"op":"buy"', on=BODY), dict(body=b'{"op":"buy","n":1}'),
     True),
    (dict(match_type=REGEX, pattern=r'"n":\s*\d+', on=BODY), dict(body=b'{"op":"buy","n": 1}'),
     True),
    (dict(match_type=POSTFIX, pattern="END", on=BODY), dict(body=b"x" * 100 + b"END"), True),
    (dict(match_type=POSTFIX, pattern="END", on=BODY),
     dict(body=b"x" * BODY_MATCH_LIMIT + b"END"), False),
    (dict(match_type=POSTFIX, pattern="abc", on=BODY), dict(body=b"\xff\xfeabc"), True),
    (dict(match_type=PREFIX, pattern="caf\u00e9", on=BODY), dict(body="caf\u00e9!".encode()), True),
    # --- negate
    (dict(match_type=PREFIX, pattern="/api", negate=True), dict(path="/api/x"), False),
    (dict(match_type=PREFIX, pattern="/api", negate=True), dict(path="/web"), True),
    (dict(match_type=POSTFIX, pattern=".png", negate=True), dict(path="/a.gif"), True),
    (dict(match_type=REGEX, pattern=r"^/u/\d", negate=True), dict(path="/u/1"), False),
    (dict(match_type=REGEX, pattern=r"^/u/\d", negate=True), dict(path="/u/x"), True),
    (dict(match_type=REGEX, pattern=r"^www\.a\.b$", on=HOST, negate=True), dict(host="www.a.b"),
     False),
    # --- ignore_case
    (dict(match_type=PREFIX, pattern="/API", ignore_case=True), dict(path="/api/x"), True),
    (dict(match_type=POSTFIX, pattern=".PNG", ignore_case=True), dict(path="/a.png"), True),
    (dict(match_type=REGEX, pattern="^/Api$", ignore_case=True), dict(path="/aPI"), True),
    (dict(match_type=REGEX, pattern="^/Api$"), dict(path="/aPI"), False),
    (dict(match_type=PREFIX, pattern="curl", ignore_case=True, on=HEADER, header="user-agent"),
     dict(headers={"user-agent": "Curl/8"}), True),
    (dict(match_type=PREFIX, pattern="get", ignore_case=True, on=METHOD), dict(method="GET"),
     True),
    # re's case folding knows more than str.lower: the long s folds to "s" for a regex only
    (dict(match_type=REGEX, pattern="^/s", ignore_case=True), dict(path="/\u017f"), True),
    (dict(match_type=REGEX, pattern=r"^k\Z", ignore_case=True), dict(path="\u212a"), True),
    (dict(match_type=PREFIX, pattern="/s", ignore_case=True), dict(path="/\u017f"), False),
    # --- `$` also matches before a final newline, `\Z` does not; (?m) makes ^ and $ per line
    (dict(match_type=REGEX, pattern=r"\.png$", on=HEADER, header="x"),
     dict(headers={"x": "a.png\n"}), True),
    (dict(match_type=REGEX, pattern=r"\.png\Z", on=HEADER, header="x"),
     dict(headers={"x": "a.png\n"}), False),
    (dict(match_type=REGEX, pattern=r"^a\.b$", on=HEADER, header="x"), dict(headers={"x": "a.b\n"}),
     True),
    (dict(match_type=REGEX, pattern=r"(?m)^b", on=HEADER, header="x"), dict(headers={"x": "a\nb"}),
     True),
    (dict(match_type=REGEX, pattern=r"(?m)a$", on=HEADER, header="x"), dict(headers={"x": "a\nb"}),
     True),
    (dict(match_type=REGEX, pattern=r"\Ab", on=HEADER, header="x"), dict(headers={"x": "a\nb"}),
     False),
]


@pytest.mark.parametrize(("options", "fields", "expected"), CASES,
                         ids=[f"{i}-{o['match_type']}-{o.get('on', URL)}"
                              for i, (o, _, _) in enumerate(CASES)])
def test_option(options: dict[str, Any], fields: dict[str, Any], expected: bool) -> None:
    r = rule("r", **options)
    assert matches(r, FakeRequest(**fields)) is expected


def test_every_match_type_on_every_subject() -> None:
    """The same text in each subject, matched by each match type."""
    subjects: list[tuple[MatchOn, dict[str, Any]]] = [
        (URL, dict(path="/abc")), (HOST, dict(host="/abc:1")), (METHOD, dict(method="/abc")),
        (SRC_IP, dict(src_ip="/abc")), (HEADER, dict(headers={"h": "/abc"})),
        (BODY, dict(body=b"/abc"))]
    for on, fields in subjects:
        header = "H" if on is HEADER else ""
        for mt, hit, miss in [(PREFIX, "/ab", "abc"), (POSTFIX, "bc", "/ab"),
                              (REGEX, "^/a.c$", "^/a.$")]:
            req = FakeRequest(**fields)
            assert matches(rule("r", mt, hit, on=on, header=header), req), (on, mt)
            assert not matches(rule("r", mt, miss, on=on, header=header),
                               FakeRequest(**fields)), (on, mt)


def test_fail_on_match_refuses() -> None:
    deny = rule("deny", PREFIX, "/admin", fail_on_match=True)
    web = rule("web", PREFIX, "/")
    assert route([deny, web], FakeRequest(path="/admin/x")) == REFUSE
    assert route([deny, web], FakeRequest(path="/index")) == 1
    assert route([deny], FakeRequest(path="/index")) == NO_MATCH
    # Refusal is a match like any other: an earlier match wins over it.
    assert route([web, deny], FakeRequest(path="/admin/x")) == 0


def test_set_flag_marks_and_continues() -> None:
    mark = rule("mark", PREFIX, "/", on=URL, set_flag=1)
    need = rule("need", PREFIX, "/x", only_if_flag=1)
    assert route([mark, need], FakeRequest(path="/x")) == 1
    # A marker never selects its SubVS, even when nothing else matches.
    assert route([mark], FakeRequest(path="/x")) == NO_MATCH
    assert route([mark], FakeRequest(path="/x"), default=True) == 1
    # set_flag wins over fail_on_match: it is a marker.
    marker_refusing = rule("mark", PREFIX, "/", set_flag=1, fail_on_match=True)
    assert route([marker_refusing, need], FakeRequest(path="/x")) == 1


def test_only_if_flag_and_only_if_not_flag() -> None:
    mobile = rule("mobile", REGEX, "(?i)mobile", on=HEADER, header="user-agent", set_flag=2)
    m_site = rule("m_site", PREFIX, "/", only_if_flag=2)
    desktop = rule("desktop", PREFIX, "/", only_if_not_flag=2)
    rules = [mobile, m_site, desktop]
    assert route(rules, FakeRequest(headers={"user-agent": "X Mobile"})) == 1
    assert route(rules, FakeRequest(headers={"user-agent": "X11"})) == 2
    # A flag set by a later rule is not yet set.
    assert route([m_site, mobile], FakeRequest(headers={"user-agent": "Mobile"})) == NO_MATCH
    # A skipped rule does not match even if its pattern does.
    assert route([m_site], FakeRequest(path="/")) == NO_MATCH
    # Both conditions at once, and several flags.
    a = rule("a", PREFIX, "/", set_flag=1)
    b = rule("b", PREFIX, "/b", set_flag=3)
    both = rule("both", PREFIX, "/", only_if_flag=1, only_if_not_flag=3)
    assert route([a, b, both], FakeRequest(path="/a")) == 2
    assert route([a, b, both], FakeRequest(path="/b")) == NO_MATCH
    # A flag rule behind a plain match is never reached; one ahead of it is.
    plain = rule("plain", PREFIX, "/")
    assert route([plain, m_site, mobile], FakeRequest(headers={"user-agent": "Mobile"})) == 0
    assert route([mobile, m_site, plain], FakeRequest(headers={"user-agent": "Mobile"})) == 1


def test_default_rule_matches_everything_and_ends_the_search() -> None:
    api = rule("api", PREFIX, "/api")
    assert route([api], FakeRequest(path="/web"), default=True) == 1
    assert route([api], FakeRequest(path="/api"), default=True) == 0
    # rule_order moves `default` last unless an explicit precedence says otherwise.
    vs = make_vs({"dflt": ["default"], "api": ["api"]})
    router = compile_router(vs, {"api": api})
    assert router.route(FakeRequest(path="/api")) == 1
    vs = make_vs({"dflt": ["default"], "api": ["api"]}, precedence=("default", "api"))
    router = compile_router(vs, {"api": api})
    assert router.route_with_rule(FakeRequest(path="/api")) == (0, 0)
    assert router.rule_names == ("default", "api")


def test_precedence_first_match_wins() -> None:
    broad = rule("broad", PREFIX, "/")
    narrow = rule("narrow", PREFIX, "/api")
    tail = rule("tail", POSTFIX, ".json")
    req = FakeRequest(path="/api/x.json")
    assert route([broad, narrow, tail], req) == 0
    assert route([narrow, broad, tail], req) == 0
    assert route([tail, narrow, broad], req) == 0
    assert route([narrow, tail], FakeRequest(path="/web/x.json")) == 1
    # An explicit precedence list reorders across SubVSs.
    assert route([broad, narrow, tail], req, precedence=("tail", "narrow", "broad")) == 2
    assert route([broad, narrow, tail], req, precedence=("narrow", "broad", "tail")) == 1


def test_subvs_index_and_rule_index() -> None:
    a = rule("a", PREFIX, "/a")
    b = rule("b", PREFIX, "/b")
    c = rule("c", PREFIX, "/c")
    vs = make_vs({"one": ["a", "c"], "two": ["b"]})
    router = compile_router(vs, {"a": a, "b": b, "c": c})
    assert router.subvs_names == ("one", "two")
    assert router.rule_names == ("a", "c", "b")
    assert router.route_with_rule(FakeRequest(path="/c")) == (0, 1)
    assert router.route_with_rule(FakeRequest(path="/b")) == (1, 2)
    assert router.route_with_rule(FakeRequest(path="/z")) == (NO_MATCH, NO_MATCH)
    assert not router.needs_body


def test_needs_body_only_for_live_body_rules() -> None:
    body = rule("body", PREFIX, "x", on=BODY)
    assert router_for([body])[0].needs_body
    assert not router_for([body], default=True, precedence=("default", "body"))[0].needs_body


def test_unknown_rule_is_a_config_error() -> None:
    vs = make_vs({"s": ["nope"]})
    with pytest.raises(ConfigError, match="nope"):
        compile_router(vs, {})


def test_no_rules_never_match() -> None:
    router = compile_router(make_vs({}), {})
    assert router.route(FakeRequest()) == NO_MATCH
    assert router.rule_names == ()


def test_acme_challenge_rule_first() -> None:
    token = "Xy-_09abcdefghijklmnopqrstuvwxyzABCDEFGHIJK"
    acme = rule("acme", REGEX, rf"^example\.com(:\d+)?/\.well-known/acme-challenge/{token}$",
                include_host=True)
    site = rule("site", PREFIX, "/")
    rules = [acme, site]
    path = f"/.well-known/acme-challenge/{token}"
    assert route(rules, FakeRequest(host="example.com", path=path)) == 0
    assert route(rules, FakeRequest(host="example.com:80", path=path)) == 0
    assert route(rules, FakeRequest(host="other.com", path=path)) == 1
    assert route(rules, FakeRequest(host="example.com", path=path + "x")) == 1
    assert route(rules, FakeRequest(host="example.com", path=path[:-1])) == 1


def make_many(count: int) -> list[ContentRule]:
    """A mix of prefixes, postfixes, host rules and regexes, none matching "/nothing"."""
    out: list[ContentRule] = []
    for i in range(count):
        k = i % 6
        if k == 0:
            out.append(rule(f"p{i}", PREFIX, f"/app{i}/"))
        elif k == 1:
            out.append(rule(f"x{i}", POSTFIX, f".ext{i}", ignore_case=True))
        elif k == 2:
            out.append(rule(f"h{i}", REGEX, rf"^host{i}\.example\.com$", on=HOST))
        elif k == 3:
            out.append(rule(f"r{i}", REGEX, rf"^/api/v{i}/users/\d+$"))
        elif k == 4:
            out.append(rule(f"q{i}", REGEX, rf"[?&]tenant={i}(&|$)", include_query=True))
        else:
            out.append(rule(f"m{i}", PREFIX, f"svc{i}-", on=HEADER, header="x-svc"))
    return out


def test_1024_rules() -> None:
    rules = make_many(1024)
    router, vs = router_for(rules)
    defined = {r.name: r for r in rules}
    reqs = [FakeRequest(path="/nothing")]
    for i in (0, 1, 2, 3, 4, 5, 6, 500, 511, 1017, 1018, 1019, 1020, 1021, 1022, 1023):
        reqs += [FakeRequest(path=f"/app{i}/x"), FakeRequest(path=f"/f.EXT{i}"),
                 FakeRequest(host=f"host{i}.example.com:8443"),
                 FakeRequest(path=f"/api/v{i}/users/42"),
                 FakeRequest(path="/q", query=f"a=1&tenant={i}"),
                 FakeRequest(headers={"x-svc": f"svc{i}-blue"})]
    for req in reqs:
        assert router.route_with_rule(req) == reference_route(vs, defined, req), req
    # Spot checks that the right rule wins.
    assert router.route(FakeRequest(path="/app1020/x")) == 1020
    assert router.route(FakeRequest(path="/api/v1023/users/7")) == 1023
    assert router.route(FakeRequest(host="host1022.example.com")) == 1022
    assert router.route(FakeRequest(path="/nothing")) == NO_MATCH
    # The same text hit by an early and a late rule: the early one wins.
    early = rule("early", PREFIX, "/app1020/")
    router, _ = router_for([early, *rules])
    assert router.route(FakeRequest(path="/app1020/x")) == 0


def test_start_anchored_regexes_on_one_literal_run_combined() -> None:
    """Several `^/api/v<digits>/...` rules share the literal "/api/v": they run as one regex whose
    first matching alternative is the first rule; inline flags and group references keep a
    regex out of the combination (it would not compile or would mean something else)."""
    rules = [rule("a", REGEX, r"^/api/v\d+/cart/"),
             rule("b", REGEX, r"(?i)^/api/v\d+/SHOP/", ignore_case=True),
             rule("c", REGEX, r"^/api/v\d+/(shop|cart)/"),
             rule("d", REGEX, r"^/api/v\d+/(x)\1/"),
             rule("e", REGEX, r"^/api/v\d+/"),
             rule("f", REGEX, r"^/api/v\d+/cart/x", negate=True)]
    router, vs = router_for(rules)
    defined = {r.name: r for r in rules}
    for path, want in [("/api/v2/cart/", 0), ("/api/v2/shop/", 1), ("/api/v2/xx/", 3),
                       ("/api/v2/other", 4), ("/api/v2", 5), ("/api/v2/cart/x", 0)]:
        req = FakeRequest(path=path)
        assert router.route(req) == want, path
        assert router.route_with_rule(req) == reference_route(vs, defined, req)


def test_free_regexes_run_in_order_and_negated() -> None:
    """Regexes with no literal to go by run one by one (inline or in a loop), first wins."""
    rules = [rule("a", REGEX, r"\d{3}"), rule("b", REGEX, r"x+y", negate=True),
             rule("c", REGEX, r"[a-z]+\.php")]
    for path, want in [("/123", 0), ("/xy/1", NO_MATCH), ("/a.php", 1), ("/xxy/a.php", 2),
                       ("/xy", NO_MATCH)]:
        assert route(rules, FakeRequest(path=path)) == want, path


def test_a_combination_that_fails_runs_its_regexes_one_by_one(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import re

    from lbproxy.routing import tables

    def broken(entries: object) -> object:
        raise re.error("no")

    monkeypatch.setattr(tables, "_combo", broken)
    rules = [rule(f"r{i}", REGEX, rf"^/api/v\d+/x{i}/") for i in range(4)]
    assert route(rules, FakeRequest(path="/api/v1/x2/")) == 2
    assert "one by one" in caplog.text


def test_free_regexes_with_text_are_found_by_one_scan() -> None:
    """Unanchored regexes that need some text (`/item\\d+/` needs "/item") only run when one scan
    of the subject finds that text; texts that are prefixes of others are found with them."""
    rules = [rule(f"i{i}", REGEX, rf"/item{i}/\d+") for i in range(6)]
    rules += [rule("short", REGEX, r"/item\d/x"), rule("php", REGEX, r"(?i)\.PHP\b"),
              rule("digits", REGEX, r"\d{5}")]
    for path, want in [("/shop/item3/42", 3), ("/item1/x", 6), ("/item12/7", NO_MATCH),
                       ("/a/INDEX.php?", 7), ("/a/12345", 8), ("/item/x", NO_MATCH),
                       ("/item5/a/item0/9", 0)]:
        assert route(rules, FakeRequest(path=path)) == want, path


def test_config_text_never_enters_the_generated_source() -> None:
    evil = 'x"\nimport os; os._exit(3)\n#'
    r = rule("r", PREFIX, evil, on=HEADER, header=evil)
    router, _ = router_for([r])
    assert evil not in router.source and "import" not in router.source
    assert router.route(FakeRequest(headers={evil.lower(): evil + "!"})) == 0
