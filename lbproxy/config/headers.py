"""What a header rule may say ([vs.headers], [vs.subvs.headers]): the checks of names, values
and templates, and the template syntax itself, shared by the loader and the data plane's compiler
(proxy/headerrules.py).

A value is a template: literal text and variables, `$name` or `${name}`, `$$` for a "$". Names
are RFC 9110 tokens; values visible ASCII, space and tab (no CR, LF, NUL or other control byte,
so nothing can split a field or a message); both bounded (model.MAX_HEADER_*). Fields that frame,
route or manage the connection are never rule targets: the proxy owns them.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from .model import (
    MAX_HEADER_NAME,
    MAX_HEADER_RULES,
    MAX_HEADER_VALUE,
    NO_HEADER_RULES,
    HeaderRules,
    Hsts,
)
from .model import Protocol as Scheme

# The variables a value may use, and what each one is.
VARIABLES = {
    "client_ip": "the client's address (the PROXY protocol's, when one was accepted)",
    "remote_addr": "the same as $client_ip (nginx's name)",
    "scheme": "http or https, the VS's protocol",
    "host": "the request's Host as sent (with its port, if any); empty without one",
    "server_port": "the port the VS listens on",
}

# Request fields no rule may touch: framing (Content-Length, Transfer-Encoding), routing (Host),
# the connection's own (RFC 9110 §7.6.1 hop-by-hop, Upgrade, Expect, HTTP2-Settings), and those
# the forwarding options own (add_forwarded_headers, headers.forwarded, x_forwarded_proto).
FORBIDDEN_REQUEST = {
    "host": "routes the request",
    "content-length": "frames the message",
    "transfer-encoding": "frames the message",
    "connection": "is hop-by-hop (the proxy manages the connection)",
    "keep-alive": "is hop-by-hop",
    "proxy-connection": "is hop-by-hop",
    "te": "is hop-by-hop",
    "trailer": "is hop-by-hop",
    "upgrade": "is hop-by-hop (the proxy relays upgrades itself)",
    "expect": "is answered by the proxy itself",
    "http2-settings": "is hop-by-hop",
    "proxy-authorization": "is hop-by-hop",
    "proxy-authenticate": "is hop-by-hop",
    "x-forwarded-for": "is written by add_forwarded_headers",
    "x-forwarded-host": "is written by add_forwarded_headers",
    "x-forwarded-proto": "is written by add_forwarded_headers or headers.x_forwarded_proto",
    "forwarded": "is written by headers.forwarded",
}
# In responses, the same minus what only a request carries (routing, Expect, the proxy's own
# forwarding fields, the client's hop-by-hop credentials and HTTP/2 settings).
FORBIDDEN_RESPONSE = {k: why for k, why in FORBIDDEN_REQUEST.items()
                      if k not in ("host", "expect", "http2-settings", "proxy-authorization")
                      and not k.startswith(("x-forwarded-", "forwarded"))}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Visible ASCII, space and horizontal tab: nothing else may reach a field value.
_VALUE = re.compile(r"[\t\x20-\x7e]*")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)|(\$))")


def name_problem(name: str, forbidden: dict[str, str]) -> str | None:
    """What is wrong with `name` as a rule's target, or None."""
    if not name:
        return "a header name cannot be empty"
    if len(name) > MAX_HEADER_NAME:
        return f"the header name is {len(name)} characters; the limit is {MAX_HEADER_NAME}"
    if not _TOKEN.fullmatch(name):
        return (f"{_short(name)} is not a valid header name (letters, digits and "
                "!#$%&'*+.^_`|~- only)")
    why = forbidden.get(name.lower())
    if why is not None:
        return f"{name} cannot be a rule's target: it {why}"
    return None


def value_problem(value: str) -> str | None:
    """What is wrong with `value` as a template, or None."""
    if len(value) > MAX_HEADER_VALUE:
        return f"the value is {len(value)} characters; the limit is {MAX_HEADER_VALUE}"
    if not _VALUE.fullmatch(value):
        bad = next(c for c in value if not _VALUE.fullmatch(c))
        return (f"the value contains {bad!r}: only visible ASCII, space and tab are allowed "
                "(no CR, LF, NUL or other control characters)")
    if value != value.strip(" \t"):
        return "the value must not begin or end with spaces"
    try:
        parse_template(value)
    except ValueError as e:
        return str(e)
    return None


def parse_template(value: str) -> list[tuple[bool, str]]:
    """`value` as pieces: (False, literal text) or (True, variable name), literals merged;
    raises ValueError naming an unknown variable or a "$" that starts none."""
    out: list[tuple[bool, str]] = []
    pos = 0
    lit = ""
    while True:
        i = value.find("$", pos)
        if i < 0:
            lit += value[pos:]
            break
        lit += value[pos:i]
        m = _VAR.match(value, i)
        if m is None:
            raise ValueError(f"a '$' at position {i} starts no variable (write $$ for a '$'; "
                             f"variables: {_names()})")
        if m.group(3):
            lit += "$"
        else:
            var = m.group(1) or m.group(2)
            if var not in VARIABLES:
                raise ValueError(f"unknown variable ${var}; known: {_names()}")
            if lit:
                out.append((False, lit))
                lit = ""
            out.append((True, var))
        pos = m.end()
    if lit:
        out.append((False, lit))
    return out


def _names() -> str:
    return ", ".join("$" + n for n in VARIABLES)


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


class _Table(Protocol):
    """The loader's table reader (reader._Reader), as read here (no import: it imports us)."""

    data: dict[str, Any]
    used: set[str]

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any: ...

    def error(self, message: str, key: str | None = None) -> None: ...

    def table(self, key: str) -> Any: ...

    def str_list(self, key: str) -> tuple[str, ...]: ...

    def flag(self, key: str, default: bool) -> bool: ...

    def integer(self, key: str, default: int, lo: int, hi: int) -> int: ...

    def finish(self) -> None: ...


# HSTS preload lists want a year at least, and subdomains included (hstspreload.org).
_PRELOAD_MIN_AGE = 31_536_000
_HSTS_NAME = "strict-transport-security"


def header_rules(r: _Table, scheme: Scheme) -> HeaderRules:
    """The `headers` table of a VS or SubVS table `r` (absent: no rules); `scheme`: the VS's."""
    if "headers" not in r.data:
        r.used.add("headers")
        return NO_HEADER_RULES
    t = r.table("headers")
    req_set = _fields(t, "request_set", FORBIDDEN_REQUEST)
    req_add = _fields(t, "request_add", FORBIDDEN_REQUEST)
    req_rm = _names_list(t, "request_remove", FORBIDDEN_REQUEST)
    resp_set = _fields(t, "response_set", FORBIDDEN_RESPONSE)
    resp_add = _fields(t, "response_add", FORBIDDEN_RESPONSE)
    resp_rm = _names_list(t, "response_remove", FORBIDDEN_RESPONSE)
    hsts = _hsts(t, scheme)
    rules = HeaderRules(
        request_add=req_add, request_set=req_set, request_remove=req_rm,
        response_add=resp_add, response_set=resp_set, response_remove=resp_rm, hsts=hsts,
        forwarded=t.flag("forwarded", False),
        x_forwarded_proto=t.flag("x_forwarded_proto", False))
    for side, set_, rm in (("request", req_set, req_rm), ("response", resp_set, resp_rm)):
        removed = {n.lower() for n in rm}
        for name, _ in set_:
            if name.lower() in removed:
                t.error(f"{name} is both set and removed; keep one", f"{side}_set.{name}")
    if hsts is not None:
        for key, pairs in (("response_set", resp_set), ("response_add", resp_add)):
            for name, _ in pairs:
                if name.lower() == _HSTS_NAME:
                    t.error("hsts already sets Strict-Transport-Security; keep one",
                            f"{key}.{name}")
    t.finish()
    return rules


def _fields(t: _Table, key: str, forbidden: dict[str, str]) -> tuple[tuple[str, str], ...]:
    raw = t._get(key, {}, (dict,), "a table of header names and values")
    if len(raw) > MAX_HEADER_RULES:
        t.error(f"{len(raw)} headers; the limit is {MAX_HEADER_RULES}", key)
        return ()
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in raw.items():
        where = f"{key}.{name}"
        problem = name_problem(name, forbidden)
        if problem is None:
            if not isinstance(value, str):
                problem = f"expected a string, got {type(value).__name__}"
            else:
                problem = value_problem(value)
        if problem is None and name.lower() in seen:
            problem = f"{name} is listed twice (names are case-insensitive)"
        if problem is not None:
            t.error(problem, where)
            continue
        seen.add(name.lower())
        out.append((name, value))
    return tuple(out)


def _names_list(t: _Table, key: str, forbidden: dict[str, str]) -> tuple[str, ...]:
    names = t.str_list(key)
    if len(names) > MAX_HEADER_RULES:
        t.error(f"{len(names)} headers; the limit is {MAX_HEADER_RULES}", key)
        return ()
    out = []
    for i, name in enumerate(names):
        problem = name_problem(name, forbidden)
        if problem is not None:
            t.error(problem, f"{key}[{i}]")
        else:
            out.append(name)
    return tuple(out)


def _hsts(t: _Table, scheme: Scheme) -> Hsts | None:
    """`hsts = true` (the defaults) or `hsts = { max_age = ..., include_subdomains = ...,
    preload = ... }`; absent or false: none. Only on an HTTPS VS."""
    raw = t.data.get("hsts")
    if raw is None or raw is False:
        t.used.add("hsts")
        return None
    if raw is True:
        t.used.add("hsts")
        hsts = Hsts()
    else:
        h = t.table("hsts")
        d = Hsts()
        hsts = Hsts(max_age=h.integer("max_age", d.max_age, 0, 1_000_000_000),
                    include_subdomains=h.flag("include_subdomains", d.include_subdomains),
                    preload=h.flag("preload", d.preload))
        h.finish()
        if isinstance(raw, dict) and hsts.preload and (
                not hsts.include_subdomains or hsts.max_age < _PRELOAD_MIN_AGE):
            t.error(f"preload needs include_subdomains = true and max_age >= "
                    f"{_PRELOAD_MIN_AGE} (one year)", "hsts.preload")
    if scheme is not Scheme.HTTPS:
        t.error("applies to HTTPS VSs only (a browser ignores it over plain HTTP)", "hsts")
        return None
    return hsts
