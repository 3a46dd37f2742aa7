"""Hostile input to every state-changing admin route (certificates and /api/le/...): each is
answered with a JSON 4xx that names the field, and nothing is changed; unknown routes and
methods answer JSON; a handler's own failure is a JSON 500 with the traceback logged."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from lbproxy.admin.le_api import add_routes
from tests.admin.conftest import Admin, running_admin
from tests.certs.helpers import tree_digest

MAX_BODY = 1024 * 1024  # lbproxy.admin.api.MAX_BODY, restated: the test pins the contract


class FakeManager:
    """Stands in for LEManager behind /api/le/...: records every call; hostile input must
    never reach it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.settings = SimpleNamespace(directory_url="https://ca.test/dir")

    def _record(self, name: str) -> dict[str, Any]:
        self.calls.append(name)
        return {}

    def account_view(self) -> dict[str, Any]:
        return {}

    async def register(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return self._record("register")

    async def upload_key(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return self._record("upload_key")

    async def set_directory(self, *_a: Any, **_k: Any) -> None:
        self._record("set_directory")

    async def set_renew_period(self, *_a: Any, **_k: Any) -> None:
        self._record("set_renew_period")

    async def set_email(self, *_a: Any, **_k: Any) -> None:
        self._record("set_email")

    async def request(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return self._record("request")

    async def renew(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return self._record("renew")

    async def delete(self, *_a: Any, **_k: Any) -> None:
        self._record("delete")

    async def backup(self, *_a: Any, **_k: Any) -> bytes:
        self._record("backup")
        return b""

    async def restore(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return self._record("restore")

    async def convert_vs(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        return self._record("convert_vs")


@dataclass
class Rig:
    admin: Admin
    manager: FakeManager

    def snapshot(self) -> tuple[str, list[str]]:
        return tree_digest(self.admin.state), list(self.manager.calls)


def _boom(app: web.Application) -> None:
    async def crash(_r: web.Request) -> web.Response:
        raise RuntimeError("a bug in a handler")

    app.router.add_post("/api/test/crash", crash)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    manager = FakeManager()
    async with running_admin(tmp_path, extra_routes=[
            lambda app: add_routes(app, manager), _boom]) as admin:  # type: ignore[arg-type]
        yield Rig(admin, manager)


# -- the table ------------------------------------------------------------------------------------

# Field kinds: "text" (short: names, URLs, e-mail), "blob" (PEM, base64, passphrase: no length
# limit but the body's), "flag", ("int", lo, hi), ("choice", ...), "sans". "!" = required.
ROUTES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "cert import": ("POST", "/api/certs", {
        "id": "text!", "cert": "blob", "key": "blob", "chain": "blob", "pkcs12": "blob",
        "passphrase": "blob", "strict": "flag", "replace": "flag"}, {"id": "new", "cert": "x"}),
    "cert replace": ("PUT", "/api/certs/base", {
        "id": "text", "cert": "blob", "key": "blob", "chain": "blob", "pkcs12": "blob",
        "passphrase": "blob", "strict": "flag"}, {"cert": "x"}),
    "cert assign": ("POST", "/api/certs/base/assign", {"target": "text!", "default": "flag"},
                    {"target": "nope"}),
    "cert unassign": ("POST", "/api/certs/base/unassign", {"target": "text!"},
                      {"target": "nope"}),
    "le register": ("POST", "/api/le/account", {"email": "text"}, {}),
    "le upload key": ("POST", "/api/le/account/key", {"key": "blob!", "passphrase": "blob"},
                      {"key": "k"}),
    "le settings": ("PUT", "/api/le/settings", {
        "directory_url": "text", "ca_bundle": "text", "email": "text",
        "renew_period_days": ("int", 1, 60)}, {}),
    "le request": ("POST", "/api/le/certs", {
        "id": "text!", "common_name": "text", "vs": "text", "sans": "sans",
        "key_type": ("choice", "ec", "rsa"), "key_size": ("int", 2048, 4096), "wait": "flag",
        "country": "text", "state": "text", "city": "text", "company": "text",
        "unit": "text", "email": "text"}, {"id": "c1", "common_name": "a.example.com"}),
    "le renew": ("POST", "/api/le/certs/c1/renew", {"wait": "flag"}, {}),
    "le backup": ("POST", "/api/le/backup", {
        "passphrase": "blob!", "vs": "flag", "certs": "flag"}, {"passphrase": "long enough"}),
    "le restore": ("POST", "/api/le/restore", {
        "backup": "blob!", "passphrase": "blob!", "vs": "flag", "certs": "flag"},
        {"backup": "AAAA", "passphrase": "long enough"}),
}
# Routes whose body may be empty (an empty body is {}).
OPTIONAL_BODY = {"le register", "le renew"}
# Every route with a path parameter (state-changing ones without a body included).
PARAM_ROUTES = [
    ("PUT", "/api/certs/{}", "id"), ("DELETE", "/api/certs/{}", "id"),
    ("POST", "/api/certs/{}/assign", "id"), ("POST", "/api/certs/{}/unassign", "id"),
    ("POST", "/api/le/certs/{}/renew", "id"), ("DELETE", "/api/le/certs/{}", "id"),
    ("POST", "/api/le/vs/{}/convert", "name"),
]

LONG = "x" * 5000  # longer than any name, URL or subject field may be
WRONG: dict[str, list[Any]] = {
    "text": [1, True, 1.5, [], {}, LONG],
    "blob": [1, True, 1.5, [], {}],
    "flag": [1, 0, "true", "", [], {}],
}
# In every string field: lone surrogates (JSON "\ud800" is accepted by json.loads) and NUL.
BAD_STRINGS = ["\ud800", "ok\udfffok", "nul\x00"]


def _field_cases(field: str, kind: Any) -> Iterator[tuple[str, Any, str]]:
    """(label, value, field named) for one field."""
    name = kind.rstrip("!") if isinstance(kind, str) else kind[0]
    if name in WRONG:
        for v in WRONG[name]:
            yield f"{field}={str(v)[:12]!r}", v, field
    if name in ("text", "blob", "choice"):
        for v in BAD_STRINGS:
            yield f"{field}={v!r}", v, field
    if name == "int":
        lo, hi = kind[1], kind[2]
        for v in (True, False, 1.5, float(lo), str(lo), [], {}, lo - 1, hi + 1, 10**30):
            yield f"{field}={v!r}", v, field
    if name == "choice":
        for v in ("dsa", "", 1, True):
            yield f"{field}={v!r}", v, field
    if name == "sans":
        yield "sans not a list", "a.example.com", "sans"
        yield "sans an object", {"name": "a"}, "sans"
        yield "sans[0] not an object", [1], "sans[0]"
        yield "sans[0].name missing", [{"vs": "shop"}], "sans[0].name"
        yield "sans[0].name wrong type", [{"name": True}], "sans[0].name"
        yield "sans[0].name surrogate", [{"name": "\ud800"}], "sans[0].name"
        yield "sans[0].vs wrong type", [{"name": "a", "vs": 1}], "sans[0].vs"
        yield "sans[0] unknown field", [{"name": "a", "bogus": 1}], "sans[0].bogus"
        yield "too many sans", [{"name": f"n{i}.example.com"} for i in range(11)], "sans"
        deep: Any = "x"
        for _ in range(40):
            deep = [deep]
        yield "sans nested 40 deep", deep, "sans"
    if isinstance(kind, str) and kind.endswith("!"):
        yield f"{field} null", None, field
        if name == "text" or name == "blob":
            yield f"{field} empty", "", field


def body_cases(route: str) -> Iterator[tuple[str, bytes, int, str]]:
    """(label, raw body, status, field named) for one route."""
    _, _, fields, base = ROUTES[route]
    for field, kind in fields.items():
        for label, value, named in _field_cases(field, kind):
            yield label, json.dumps({**base, field: value}).encode(), 400, named
        if isinstance(kind, str) and kind.endswith("!"):
            rest = {k: v for k, v in base.items() if k != field}
            yield f"{field} missing", json.dumps(rest).encode(), 400, field
    yield "unknown field", json.dumps({**base, "bogus": 1}).encode(), 400, "bogus"
    yield "surrogate key", json.dumps({**base, "\ud800": 1}).encode(), 400, "\\ud800"
    yield "NUL key", json.dumps({**base, "a\x00": 1}).encode(), 400, "a\\x00"
    yield "duplicate key", b'{"zz": 1, "zz": 2}', 400, "zz"
    for raw in (b"{", b"[]", b"null", b'"x"', b"1", b"true", b'{"a": NaN}',
                b'{"a": Infinity}', b'{"a": "\xff\xfe"}', b"\xef\xbb\xbf{}", b"[" * 100_000,
                b"[" * 40 + b"]" * 40, b"1" * 5000):
        yield f"body {raw[:12]!r}", raw, 400, "body"
    yield "nested 50 deep", b"{" + b'"a":{' * 50 + b"}" * 51, 400, "a"
    if route not in OPTIONAL_BODY:
        yield "empty body", b"", 400, "body"


async def send_whole(admin: Admin, method: str, path: str, body: bytes,
                     chunked: bool = False) -> tuple[int, str, str, bool]:
    """Send `body` to the end, the way urllib (the CLI) does, read the answer, and wait for the
    server to close if it says it will: (status, content type, text, closed). A 413 closes the
    connection once the server has read and dropped the rest of the body; until then its
    shutdown would wait for it. (aiohttp's client stops sending once answered and keeps the
    socket open.)"""
    host, port = admin.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        framing = ("Transfer-Encoding: chunked" if chunked
                   else f"Content-Length: {len(body)}")
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                     f"{admin.token}\r\n{framing}\r\n\r\n".encode())
        if chunked:
            step = 65536
            for i in range(0, len(body), step):
                writer.write(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step]))
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(body)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        text = (await reader.readexactly(int(fields["content-length"]))).decode()
        closed = fields.get("connection", "").lower() == "close"
        if closed:
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # the server's close, after its drain
        return int(head[0].split()[1]), fields["content-type"].split(";")[0], text, closed
    finally:
        writer.close()
        await writer.wait_closed()


def _check(status: int, ctype: str, text: str, want: int, field: str) -> str | None:
    """None if the answer is the JSON `want` naming `field`, else what is wrong."""
    if ctype != "application/json":
        return f"{status} {ctype}: {text[:120]}"
    answer = json.loads(text)
    if status != want or answer.get("field") != field or field not in answer.get("error", ""):
        return f"{status} {answer}"
    if want == 413 and str(MAX_BODY) not in answer["error"]:
        return f"413 without the limit: {answer}"
    return None


@pytest.mark.parametrize("route", list(ROUTES))
async def test_every_hostile_body_is_a_json_4xx_naming_the_field(rig: Rig, route: str) -> None:
    method, path, _, _ = ROUTES[route]
    before = rig.snapshot()
    failures = []
    for label, raw, want, field in body_cases(route):
        status, ctype, text = await rig.admin.raw(
            method, path, raw, {"Content-Type": "application/json"})
        wrong = _check(status, ctype, text, want, field)
        if wrong is not None:
            failures.append(f"{label} (want {want} naming {field!r}): {wrong}")
    status, ctype, text, _ = await send_whole(rig.admin, method, path,
                                              b"{" + b" " * (10 * MAX_BODY) + b"}")
    wrong = _check(status, ctype, text, 413, "body")
    if wrong is not None:
        failures.append(f"10 MiB body (want 413 naming 'body'): {wrong}")
    assert not failures, "\n".join(failures)
    assert rig.snapshot() == before


@pytest.mark.parametrize("route", list(ROUTES))
async def test_the_base_body_gets_past_validation(rig: Rig, route: str) -> None:
    """The table's base bodies are valid: a hostile case fails because of its own field."""
    method, path, _, base = ROUTES[route]
    status, _, text = await rig.admin.raw(method, path, json.dumps(base).encode())
    assert "field" not in json.loads(text), (status, text)


async def test_a_chunked_body_over_the_limit_is_a_json_413(rig: Rig) -> None:
    body = b'{"id": "new", "cert": "' + b"A" * (3 * MAX_BODY) + b'"}'  # length never declared
    status, ctype, text, closed = await send_whole(rig.admin, "POST", "/api/certs", body,
                                                   chunked=True)
    assert (status, ctype, closed) == (413, "application/json", True)
    answer = json.loads(text)
    assert answer["field"] == "body" and answer["limit"] == MAX_BODY
    assert str(MAX_BODY) in answer["error"]


@pytest.mark.parametrize(("method", "template", "param"), PARAM_ROUTES)
async def test_a_control_character_or_huge_path_parameter_is_refused(
        rig: Rig, method: str, template: str, param: str) -> None:
    before = rig.snapshot()
    for value in ("a%00b", "trail%0A", "del%7F", "tab%09", "x" * 2000):
        status, ctype, text = await rig.admin.raw(method, template.format(value), b"{}")
        assert _check(status, ctype, text, 400, param) is None, (value, status, text)
    assert rig.snapshot() == before


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/api/nope", 404), ("POST", "/api/le/nope", 404), ("GET", "/", 404),
    ("PATCH", "/api/certs", 405), ("DELETE", "/api/le/settings", 405),
    ("PUT", "/api/status", 405),
])
async def test_unknown_routes_and_methods_answer_json(rig: Rig, method: str, path: str,
                                                      status: int) -> None:
    got, ctype, text = await rig.admin.raw(method, path, b"{}")
    assert (got, ctype) == (status, "application/json"), text
    assert path in json.loads(text)["error"]


async def test_a_405_keeps_its_allow_header(rig: Rig) -> None:
    async with rig.admin.session.patch(rig.admin.url + "/api/certs",
                                       headers=rig.admin.auth) as resp:
        assert resp.status == 405 and resp.content_type == "application/json"
        assert set(resp.headers["Allow"].split(",")) >= {"GET", "POST"}


async def test_a_failing_handler_is_a_json_500_with_the_traceback_logged(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="lbproxy.admin"):
        status, ctype, text = await rig.admin.raw("POST", "/api/test/crash", b"{}")
    assert (status, ctype) == (500, "application/json")
    assert "traceback is in the log" in json.loads(text)["error"]
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "/api/test/crash" in record.getMessage()
    assert "a bug in a handler" in str(record.exc_info[1])  # type: ignore[index]


# -- the three faults the probe reported, as it reported them -------------------------------------

async def test_a_lone_surrogate_in_an_imported_pem_is_a_400_not_a_500(rig: Rig) -> None:
    before = rig.snapshot()
    status, ctype, text = await rig.admin.raw(
        "POST", "/api/certs", b'{"id": "s", "cert": "-----BEGIN \\ud800"}')
    assert (status, ctype) == (400, "application/json"), text
    assert json.loads(text)["field"] == "cert"
    assert rig.snapshot() == before


async def test_true_is_not_an_integer_for_renew_period_days(rig: Rig) -> None:
    status, answer = await rig.admin.call("PUT", "/api/le/settings",
                                          {"renew_period_days": True})
    assert status == 400 and answer["field"] == "renew_period_days"
    assert "got a boolean" in answer["error"]
    assert rig.manager.calls == []
    status, _ = await rig.admin.call("PUT", "/api/le/settings", {"renew_period_days": 20})
    assert status == 200 and rig.manager.calls == ["set_renew_period"]


async def test_a_10_mib_body_is_a_json_413_naming_the_limit(rig: Rig) -> None:
    status, ctype, text, closed = await send_whole(rig.admin, "POST", "/api/certs",
                                                   b"x" * (10 * MAX_BODY))
    assert (status, ctype, closed) == (413, "application/json", True)
    answer = json.loads(text)
    assert answer["field"] == "body" and answer["limit"] == MAX_BODY
    assert f"limit of {MAX_BODY} bytes" in answer["error"]


async def test_a_bearer_token_that_is_not_utf8_is_a_401_not_a_500(rig: Rig) -> None:
    host, port = rig.admin.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
                     b"\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and b"application/json" in head
    assert json.loads(body)["error"] == "missing or wrong bearer token"
