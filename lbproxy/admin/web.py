"""The admin web page: its static files, login and logout, the in-memory session store, and the
session cookie + CSRF check the admin API's auth middleware applies to requests that come
without a bearer token.

    GET  /ui/              the page (index.html); its style.css and ES modules (app.js, core.js,
                           certs.js, request.js, vs.js) beside it
    GET  /ui/session       {"logged_in": bool, "csrf"?: token} for the session cookie sent
    POST /ui/login         {"token": the admin token} -> {"csrf", "idle_timeout_s"} and the
                           session cookie (HttpOnly, SameSite=Strict, Secure over HTTPS)
    POST /ui/logout        ends the session (needs the session and its CSRF header)

A session is a random id in the cookie, mapped in memory (never on disk) to its CSRF token and
times; it ends after IDLE_TIMEOUT without a request, MAX_AGE after login, at logout, or when the
process restarts. Every state-changing request made with the cookie (any method but GET, HEAD,
OPTIONS) must carry the session's CSRF token in the X-CSRF-Token header, or is refused with 403.
The login body must be JSON (a cross-site HTML form cannot send it), a request whose Origin is
not this host is refused, and after FAILED_LOGIN_LIMIT wrong tokens within FAILED_LOGIN_WINDOW
every login is refused (429) for the rest of that window (the bearer token keeps working).
The page needs nothing but this listener: no CDN, no fonts.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from .validate import Schema, Text, read_body

logger = logging.getLogger(__name__)

SESSION_COOKIE = "lbproxy_session"
CSRF_HEADER = "X-CSRF-Token"
IDLE_TIMEOUT = 30 * 60.0  # seconds without a request before a session ends
MAX_AGE = 12 * 3600.0  # seconds after login when a session ends whatever happens
MAX_SESSIONS = 64  # beyond this, a login ends the oldest session
# More wrong tokens than this within the window, and logins are refused (429) until it passes.
FAILED_LOGIN_LIMIT = 10
FAILED_LOGIN_WINDOW = 60.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STATIC_DIR = Path(__file__).with_name("web")
STATIC_FILES = {"index.html": "text/html", "style.css": "text/css",
                **{f"{m}.js": "text/javascript" for m in ("app", "core", "certs", "request", "vs")}}
# Paths served without the token or a session (the page must load to show its login form).
PUBLIC_GET = frozenset({"/ui", "/ui/", "/ui/session",
                        *(f"/ui/{n}" for n in STATIC_FILES)})
LOGIN_PATH = "/ui/login"
LOGIN_SCHEMA: Schema = {"token": Text(required=True, max_len=4096)}
# The page loads only from this listener: scripts, styles, fetches; nothing inline.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(slots=True)
class Session:
    csrf: str
    created: float
    seen: float


class SessionStore:
    """Live sessions by id, in memory; `clock` is monotonic seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 idle_timeout: float = IDLE_TIMEOUT, max_age: float = MAX_AGE,
                 limit: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._idle = idle_timeout
        self._max_age = max_age
        self._limit = limit
        self._sessions: dict[str, Session] = {}
        self._failures: list[float] = []

    def failed_login(self) -> None:
        self._failures.append(self._clock())

    def login_wait(self) -> float:
        """Seconds until a login may be tried again (0: now): more than FAILED_LOGIN_LIMIT
        wrong tokens within FAILED_LOGIN_WINDOW close the login for the rest of the window."""
        now = self._clock()
        self._failures = [t for t in self._failures if now - t < FAILED_LOGIN_WINDOW]
        if len(self._failures) < FAILED_LOGIN_LIMIT:
            return 0.0
        return FAILED_LOGIN_WINDOW - (now - self._failures[-FAILED_LOGIN_LIMIT])

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> tuple[str, Session]:
        now = self._clock()
        self._purge(now)
        while len(self._sessions) >= self._limit:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
            del self._sessions[oldest]
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._sessions[sid] = session
        return sid, session

    def get(self, sid: str) -> Session | None:
        """The live session `sid` (its idle time restarts), or None."""
        now = self._clock()
        session = self._sessions.get(sid)
        if session is None:
            return None
        if self._expired(session, now):
            del self._sessions[sid]
            return None
        session.seen = now
        return session

    def delete(self, sid: str) -> bool:
        return self._sessions.pop(sid, None) is not None

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.seen > self._idle or now - s.created > self._max_age

    def _purge(self, now: float) -> None:
        for sid in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[sid]


SESSIONS_KEY = web.AppKey("web_sessions", SessionStore)


def is_public(request: web.Request) -> bool:
    """The page, its files, the session probe, and the login itself need no credentials."""
    if request.method in ("GET", "HEAD"):
        return request.path in PUBLIC_GET
    return request.method == "POST" and request.path == LOGIN_PATH


def has_session_cookie(request: web.Request) -> bool:
    return bool(request.cookies.get(SESSION_COOKIE))


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _cross_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc != request.host


def admit(request: web.Request) -> web.Response | None:
    """For a request with the session cookie and no bearer token: None when its session is
    live (and, for a state-changing method, its CSRF header right), else the refusal."""
    sessions = request.app[SESSIONS_KEY]
    session = sessions.get(request.cookies.get(SESSION_COOKIE, ""))
    if session is None:
        return _refuse(401, "the session has ended or is unknown; log in again")
    if request.method in SAFE_METHODS:
        return None
    given = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
    if not given:
        return _refuse(403, f"missing CSRF token: a state-changing request made with the "
                            f"session cookie needs the {CSRF_HEADER} header")
    if not hmac.compare_digest(given, session.csrf.encode()):
        return _refuse(403, f"wrong CSRF token in {CSRF_HEADER}")
    if _cross_origin(request):
        return _refuse(403, "cross-origin request refused")
    return None


def web_routes(token: str) -> Callable[[web.Application], None]:
    """A registrar for the admin application: the page and its login/logout routes. The
    session store goes under SESSIONS_KEY, where the auth middleware finds it."""
    expected = token.encode()

    def static(name: str) -> web.FileResponse:
        resp = web.FileResponse(STATIC_DIR / name, headers=SECURITY_HEADERS)
        resp.content_type = STATIC_FILES[name]
        return resp

    async def to_page(_r: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def index(_r: web.Request) -> web.StreamResponse:
        return static("index.html")

    async def asset(r: web.Request) -> web.StreamResponse:
        name = r.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return static(name)

    async def session(r: web.Request) -> web.Response:
        sid = r.cookies.get(SESSION_COOKIE, "")
        s = r.app[SESSIONS_KEY].get(sid) if sid else None
        body: dict[str, object] = {"logged_in": s is not None}
        if s is not None:
            body["csrf"] = s.csrf
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def login(r: web.Request) -> web.Response:
        if _cross_origin(r):
            return _refuse(403, "cross-origin login refused")
        if r.content_type != "application/json":
            return _refuse(415, "the login body must be JSON: {\"token\": ...}")
        sessions = r.app[SESSIONS_KEY]
        wait = sessions.login_wait()
        if wait > 0:
            return web.json_response(
                {"error": f"too many wrong tokens; try again in {math.ceil(wait)} s",
                 "field": "token"}, status=429, headers={"Retry-After": str(math.ceil(wait))})
        data = await read_body(r, LOGIN_SCHEMA)
        given = data.text("token").strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            sessions.failed_login()
            logger.warning("admin web login refused (wrong token) from %s", r.remote)
            return web.json_response({"error": "wrong admin token", "field": "token"},
                                     status=401)
        old = r.cookies.get(SESSION_COOKIE)
        if old:
            sessions.delete(old)  # a new login never reuses an id the browser held before
        sid, s = sessions.create()
        resp = web.json_response({"csrf": s.csrf, "idle_timeout_s": IDLE_TIMEOUT},
                                 headers={"Cache-Control": "no-store"})
        resp.set_cookie(SESSION_COOKIE, sid, path="/", httponly=True, samesite="Strict",
                        secure=r.secure)
        return resp

    async def logout(r: web.Request) -> web.Response:
        # Reached only through the auth middleware: a live session and its CSRF header.
        r.app[SESSIONS_KEY].delete(r.cookies.get(SESSION_COOKIE, ""))
        resp = web.json_response({"logged_out": True})
        resp.del_cookie(SESSION_COOKIE, path="/", samesite="Strict", secure=r.secure)
        return resp

    def register(app: web.Application) -> None:
        app[SESSIONS_KEY] = SessionStore()
        app.router.add_get("/ui", to_page)
        app.router.add_get("/ui/", index)
        app.router.add_get("/ui/session", session)
        app.router.add_post(LOGIN_PATH, login)
        app.router.add_post("/ui/logout", logout)
        app.router.add_get("/ui/{name}", asset)

    return register
