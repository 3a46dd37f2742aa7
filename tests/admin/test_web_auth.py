"""The web page's login, session cookie and CSRF check on the admin API (lbproxy.admin.web),
over a real admin listener: cookie attributes (Secure over HTTPS), CSRF refusals (403), logout,
expiry, and the bearer token's behaviour left as it was for the CLI."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from pathlib import Path

import aiohttp
import trustme

from lbproxy.admin import create_app, load_or_create_token, start_admin
from lbproxy.admin.server import AdminTLS
from lbproxy.admin.web import (
    CSRF_HEADER,
    FAILED_LOGIN_LIMIT,
    FAILED_LOGIN_WINDOW,
    IDLE_TIMEOUT,
    MAX_AGE,
    MAX_SESSIONS,
    SESSION_COOKIE,
    STATIC_DIR,
    STATIC_FILES,
    SessionStore,
)
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.model import Address
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import RuntimeStore
from tests.admin.conftest import CONFIG, STATS, Admin
from tests.certs.helpers import client_context, issue


async def login(a: Admin, token: str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """(status, {cookie attribute: value}, CSRF token) of POST /ui/login."""
    async with a.session.post(a.url + "/ui/login", json={"token": token or a.token},
                              headers=headers or {}) as r:
        body = await r.json()
        raw = r.headers.get("Set-Cookie", "")
    attrs: dict[str, str] = {}
    if raw:
        morsel = SimpleCookie(raw)[SESSION_COOKIE]
        attrs = {"value": morsel.value, **{k: str(v) for k, v in morsel.items() if v}}
    return r.status, attrs, body.get("csrf", "") if isinstance(body, dict) else ""


async def with_cookie(a: Admin, method: str, path: str, sid: str, csrf: str | None = None,
                      body: object = None) -> tuple[int, dict[str, object]]:
    headers = {"Cookie": f"{SESSION_COOKIE}={sid}"}
    if csrf is not None:
        headers[CSRF_HEADER] = csrf
    return await a.call(method, path, body, headers=headers)


async def test_page_served_without_token_and_self_contained(admin: Admin) -> None:
    async with admin.session.get(admin.url + "/ui", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/ui/"
    for name, ctype in (("", "text/html"), ("app.js", "text/javascript"),
                        ("certs.js", "text/javascript"), ("style.css", "text/css")):
        async with admin.session.get(f"{admin.url}/ui/{name}") as r:
            assert r.status == 200 and r.content_type == ctype
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"
    assert (await admin.call("GET", "/ui/nothing.js", headers={}))[0] == 401  # not public
    assert (await admin.call("GET", "/ui/nothing.js"))[0] == 404
    assert {f.name for f in STATIC_DIR.iterdir()} == set(STATIC_FILES)  # all served, no more
    # Nothing loaded from elsewhere: no absolute URL in the page's files, no inline script.
    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"//[a-z0-9-]+\.[a-z]|@import|url\(", text), f
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script type="module" src="/ui/app.js">']


async def test_login_sets_a_strict_httponly_cookie(admin: Admin) -> None:
    status, attrs, _ = await login(admin, token="x" * 43)
    assert status == 401 and attrs == {}
    status, attrs, csrf = await login(admin)
    assert status == 200 and len(csrf) >= 40
    assert attrs["httponly"] and attrs["samesite"] == "Strict" and attrs["path"] == "/"
    assert "secure" not in attrs  # plain HTTP on loopback
    assert attrs["value"] != admin.token and attrs["value"] != csrf
    status, body = await with_cookie(admin, "GET", "/ui/session", attrs["value"])
    assert status == 200 and body == {"logged_in": True, "csrf": csrf}
    status, body = await admin.call("GET", "/ui/session", headers={})
    assert body == {"logged_in": False}


async def test_state_changes_need_the_csrf_header(admin: Admin) -> None:
    _, attrs, csrf = await login(admin)
    sid = attrs["value"]
    status, body = await with_cookie(admin, "GET", "/api/certs", sid)
    assert status == 200 and [c["id"] for c in body["certificates"]] == ["base"]
    for given in (None, "", "forged", csrf + "x"):
        status, body = await with_cookie(admin, "DELETE", "/api/certs/base", sid, given)
        assert status == 403 and "CSRF" in str(body["error"]), (given, body)
        status, body = await with_cookie(admin, "POST", "/api/certs/base/unassign", sid, given,
                                         {"target": "shop"})
        assert status == 403
    assert admin.store.get("base") is not None
    status, body = await with_cookie(admin, "POST", "/api/certs/base/assign", sid, csrf,
                                     {"target": "shop"})
    assert status == 200 and body["assigned"] == "base"
    # a cross-origin request with the right token is refused too
    status, _ = await admin.call("POST", "/api/certs/base/assign", {"target": "shop"}, headers={
        "Cookie": f"{SESSION_COOKIE}={sid}", CSRF_HEADER: csrf, "Origin": "http://evil.test"})
    assert status == 403


async def test_bearer_token_behaviour_unchanged(admin: Admin) -> None:
    status, body = await admin.call("GET", "/api/status", headers={})
    assert (status, body) == (401, {"error": "missing bearer token"})
    status, body = await admin.call("GET", "/api/status", headers={"Authorization": "Bearer no"})
    assert (status, body) == (401, {"error": "missing or wrong bearer token"})
    # A wrong bearer token is not rescued by a live session cookie.
    _, attrs, _ = await login(admin)
    status, _ = await admin.call("GET", "/api/status", headers={
        "Authorization": "Bearer no", "Cookie": f"{SESSION_COOKIE}={attrs['value']}"})
    assert status == 401
    # The CLI's way: bearer token, no cookie, no CSRF header.
    status, body = await admin.call("POST", "/api/certs/base/assign", {"target": "shop"})
    assert status == 200
    async with admin.session.get(admin.url + "/api/status") as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="lbproxy"'
    status, _ = await admin.call("POST", "/ui/logout", headers={})
    assert status == 401


async def test_logout_ends_the_session(admin: Admin) -> None:
    _, attrs, csrf = await login(admin)
    sid = attrs["value"]
    status, _ = await with_cookie(admin, "POST", "/ui/logout", sid)
    assert status == 403  # logout is state-changing too
    async with admin.session.post(admin.url + "/ui/logout", headers={
            "Cookie": f"{SESSION_COOKIE}={sid}", CSRF_HEADER: csrf}) as r:
        assert r.status == 200
        gone = SimpleCookie(r.headers["Set-Cookie"])[SESSION_COOKIE]
        assert gone.value == "" and gone["max-age"] == "0"
    status, body = await with_cookie(admin, "GET", "/api/certs", sid)
    assert status == 401 and "log in again" in str(body["error"])
    status, _ = await with_cookie(admin, "GET", "/api/certs", "made-up-session-id")
    assert status == 401


async def test_login_refusals(admin: Admin) -> None:
    status, _, _ = await login(admin, headers={"Origin": "http://evil.test"})
    assert status == 403
    status, _, _ = await login(admin, headers={"Origin": admin.url})
    assert status == 200
    async with admin.session.post(admin.url + "/ui/login",
                                  data={"token": admin.token}) as r:  # an HTML form's body
        assert r.status == 415 and "Set-Cookie" not in r.headers
    status, body = await admin.call("POST", "/ui/login", {"token": admin.token, "x": 1},
                                    headers={})
    assert status == 400 and body["field"] == "x"


def test_sessions_expire() -> None:
    now = [1000.0]
    store = SessionStore(clock=lambda: now[0], idle_timeout=60, max_age=300, limit=3)
    sid, s = store.create()
    now[0] += 59
    assert store.get(sid) is s  # and its idle time restarts
    now[0] += 59
    assert store.get(sid) is s
    now[0] += 61
    assert store.get(sid) is None and len(store) == 0
    sid, _ = store.create()
    for _ in range(5):
        now[0] += 50
        assert store.get(sid) is not None
    now[0] += 51  # 301 s after login: over max_age although never idle for long
    assert store.get(sid) is None
    first, _ = store.create()
    now[0] += 1
    others = [store.create()[0] for _ in range(3)]
    assert store.get(first) is None and all(store.get(o) for o in others) and len(store) == 3
    assert store.delete(others[0]) and not store.delete(others[0])


async def test_cookie_is_secure_over_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    state = tmp_path / "state"
    runtime = RuntimeStore(parse_config(CONFIG, base=tmp_path))
    store = CertStore(state, usage=config_usage(lambda: runtime.current.config))
    store.import_pem("adm", *issue(ca, "127.0.0.1"))
    store.assign("adm", "admin")
    token = load_or_create_token(state)
    app = create_app(runtime=runtime, dataplane_stats=lambda: STATS, store=store,
                     tls=TLSContexts(store, runtime.current.effective_services()), token=token)
    server = await start_admin(app, Address("127.0.0.1", 0), tls=AdminTLS(store))
    try:
        assert server.scheme == "https"
        async with aiohttp.ClientSession() as s, s.post(
                f"https://127.0.0.1:{server.port}/ui/login", json={"token": token},
                ssl=client_context(ca)) as r:
            assert r.status == 200
            morsel = SimpleCookie(r.headers["Set-Cookie"])[SESSION_COOKIE]
            assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Strict"
    finally:
        await server.close()


def test_docs_state_the_session_rules() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "web.md").read_text()
    text = " ".join(doc.split())
    for claim in (f"`{SESSION_COOKIE}`", f"`{CSRF_HEADER}`", f"{IDLE_TIMEOUT / 60:.0f} minutes",
                  f"{MAX_AGE / 3600:.0f} hours", f"At most {MAX_SESSIONS} sessions",
                  f"after {FAILED_LOGIN_LIMIT} wrong tokens within a minute"):
        assert claim in text, claim
    assert FAILED_LOGIN_WINDOW == 60.0  # "a minute"


async def test_wrong_tokens_close_the_login_for_a_while(admin: Admin) -> None:
    for _ in range(FAILED_LOGIN_LIMIT):
        assert (await login(admin, token="y" * 43))[0] == 401
    status, attrs, _ = await login(admin)  # even the right token, for the rest of the window
    assert status == 429 and attrs == {}
    assert (await admin.call("GET", "/api/status"))[0] == 200  # the CLI's way is unaffected


def test_login_throttle_window() -> None:
    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    for _ in range(FAILED_LOGIN_LIMIT - 1):
        store.failed_login()
        now[0] += 1
    assert store.login_wait() == 0.0
    store.failed_login()
    assert 0 < store.login_wait() <= 60
    now[0] += 52  # the first failure leaves the window
    assert store.login_wait() == 0.0
