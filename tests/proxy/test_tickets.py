"""Session ticket keys shared between SSLContexts (tickets.py): a session one server context issued
resumes on another with the same keys, as it must between worker processes, over real TLS on
127.0.0.1 for TLS 1.2 and 1.3; rotation, an SNI switch, a failing callback and a listener context
freed in the middle of a handshake."""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from lbproxy.proxy import tickets
from lbproxy.proxy.tickets import (
    TICKET_KEY_BYTES,
    new_ticket_key,
    set_ticket_keys,
    tickets_supported,
)

T = 10.0  # seconds any socket operation or thread may take before the test fails
HOST = "localhost"
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(HOST)


@pytest.fixture(params=VERSIONS, ids=lambda v: v.name)
def version(request: pytest.FixtureRequest) -> ssl.TLSVersion:
    v: ssl.TLSVersion = request.param
    return v


@pytest.fixture
def client(ca: trustme.CA) -> ssl.SSLContext:
    """One client context per test: a session can only be offered through the context it came
    from."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


def server_context(leaf: trustme.LeafCert, version: ssl.TLSVersion,
                   keys: Sequence[bytes] | None = None) -> ssl.SSLContext:
    """A server context pinned to one TLS version; a separate object each call, as each worker
    process has its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = version
    leaf.configure_cert(ctx)
    if keys is not None:
        set_ticket_keys(ctx, keys)
    return ctx


def sni_setup(leaf: trustme.LeafCert, version: ssl.TLSVersion, listener_keys: bool,
              certificate_keys: bool, keys: Sequence[bytes]) -> ssl.SSLContext:
    """A listener context without a certificate whose sni_callback switches each handshake to a
    certificate context, as lbproxy/proxy/tls.py does."""
    listener = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    listener.minimum_version = listener.maximum_version = version
    if listener_keys:
        set_ticket_keys(listener, keys)
    certificate = server_context(leaf, version, keys if certificate_keys else None)

    def pick(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
             _ctx: ssl.SSLContext) -> int | None:
        obj.context = certificate
        return None

    listener.sni_callback = pick
    return listener


@dataclass(frozen=True, slots=True)
class Handshake:
    version: str | None
    client_reused: bool
    server_reused: bool
    session: ssl.SSLSession  # the client's, holding the newest ticket it received


GREETING = b"hello"  # sent by the server: a TLS 1.3 client has its ticket once it reads data


def connect(server: ssl.SSLContext, client: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> Handshake:
    """One TLS connection over 127.0.0.1: the server (a thread) shakes hands, sends GREETING and
    waits for the client to close; the client offers `session` and reads GREETING."""
    server_reused: list[bool] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.settimeout(T)

        def serve() -> None:
            try:
                conn, _ = lsock.accept()
                conn.settimeout(T)
                with server.wrap_socket(conn, server_side=True) as tls:
                    server_reused.append(bool(tls.session_reused))
                    tls.sendall(GREETING)
                    tls.recv(1)  # the client's close
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=serve, name="tls-server")
        thread.start()
        try:
            raw = socket.create_connection(lsock.getsockname(), timeout=T)
            with client.wrap_socket(raw, server_hostname=HOST, session=session) as tls:
                got = b""
                while len(got) < len(GREETING):  # bounded: recv returns b"" at EOF
                    chunk = tls.recv(len(GREETING) - len(got))
                    if not chunk:
                        break
                    got += chunk
                assert got == GREETING
                result = tls.version(), bool(tls.session_reused), tls.session
        finally:
            thread.join(T)
    assert not thread.is_alive(), "server thread did not finish"
    if errors:
        raise errors[0]
    version, client_reused, sess = result
    assert sess is not None
    return Handshake(version, client_reused, server_reused[0], sess)


def resumed(h: Handshake) -> bool:
    assert h.client_reused == h.server_reused, "client and server disagree on resumption"
    return h.client_reused


# -- basics ------------------------------------------------------------------------------------

def test_supported_on_this_machine() -> None:
    # lbproxy targets CPython 3.11 with OpenSSL 3: the mechanism must be available there.
    assert tickets_supported()
    assert tickets._openssl() is tickets._openssl()  # loaded once


def test_new_ticket_key() -> None:
    a, b = new_ticket_key(), new_ticket_key()
    assert len(a) == len(b) == TICKET_KEY_BYTES == 80
    assert a[:16] != b[:16] and a != b


def test_bad_arguments_are_refused(leaf: trustme.LeafCert) -> None:
    ctx = server_context(leaf, ssl.TLSVersion.TLSv1_3)
    bad_lists: list[Sequence[bytes]] = [[], [b"short"], [new_ticket_key() + b"x"]]
    for bad in (*bad_lists, new_ticket_key()):  # a lone key is not a list of keys
        with pytest.raises(ValueError):
            set_ticket_keys(ctx, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        set_ticket_keys(object(), [new_ticket_key()])  # type: ignore[arg-type]
    assert not hasattr(ctx, tickets._ATTR)  # nothing was installed along the way


# -- across contexts ---------------------------------------------------------------------------

def test_session_resumes_on_another_context_with_the_same_keys(
        leaf: trustme.LeafCert, client: ssl.SSLContext, version: ssl.TLSVersion) -> None:
    key = new_ticket_key()
    a = server_context(leaf, version, [key])
    b = server_context(leaf, version, [key])
    first = connect(a, client)
    assert first.version == version.name.replace("_", ".")
    assert not resumed(first)
    assert first.session.has_ticket
    assert resumed(connect(b, client, first.session))


def test_tickets_are_openssls_own_format(leaf: trustme.LeafCert, client: ssl.SSLContext,
                                         version: ssl.TLSVersion) -> None:
    """The callback's tickets and OpenSSL's static-key tickets (what a context falls back to)
    are interchangeable under the same key, both ways."""
    key = new_ticket_key()
    lib = tickets._openssl()
    assert isinstance(lib, tickets._OpenSSL)
    static = server_context(leaf, version)
    lib.set_static_key(lib.ssl_ctx_of(static), key)
    callback = server_context(leaf, version, [key])
    assert resumed(connect(callback, client, connect(static, client).session))
    assert resumed(connect(static, client, connect(callback, client).session))


def test_other_keys_mean_a_full_handshake(leaf: trustme.LeafCert, client: ssl.SSLContext,
                                          version: ssl.TLSVersion) -> None:
    a = server_context(leaf, version, [new_ticket_key()])
    b = server_context(leaf, version, [new_ticket_key()])
    plain = server_context(leaf, version)  # OpenSSL's own random keys
    first = connect(a, client)
    assert not resumed(connect(b, client, first.session))  # connect() checked the data went
    assert not resumed(connect(plain, client, first.session))


def test_rotation_keeps_old_tickets_and_renews_them(
        leaf: trustme.LeafCert, client: ssl.SSLContext, version: ssl.TLSVersion) -> None:
    key1, key2 = new_ticket_key(), new_ticket_key()
    a = server_context(leaf, version, [key1])
    rotated = server_context(leaf, version, [key2, key1])
    only_new = server_context(leaf, version, [key2])
    under_key1 = connect(a, client).session
    assert not resumed(connect(only_new, client, under_key1))
    renewal = connect(rotated, client, under_key1)
    assert resumed(renewal)
    # The ticket was reissued under key2, so it outlives key1.
    assert resumed(connect(only_new, client, renewal.session))


def test_setting_keys_again_replaces_them(leaf: trustme.LeafCert, client: ssl.SSLContext,
                                          version: ssl.TLSVersion) -> None:
    key1, key2 = new_ticket_key(), new_ticket_key()
    a = server_context(leaf, version, [key1])
    b = server_context(leaf, version, [key1])
    under_key1 = connect(a, client).session
    set_ticket_keys(b, [key2, key1])
    assert resumed(connect(b, client, under_key1))
    set_ticket_keys(b, [key2])
    assert not resumed(connect(b, client, under_key1))
    # b now issues under key2: a resumes its tickets once a knows key2 too.
    under_key2 = connect(b, client).session
    assert not resumed(connect(a, client, under_key2))
    set_ticket_keys(a, [key2])
    assert resumed(connect(a, client, under_key2))


# -- SNI switch --------------------------------------------------------------------------------

@pytest.mark.parametrize(("listener_keys", "certificate_keys", "resumes"), [
    (True, True, True),  # what lbproxy does: every context gets the keys
    (True, False, True),  # the listener's keys are the ones OpenSSL uses...
    (False, True, False),  # ...not those of the context the SNI callback switched to
], ids=["every-context", "listener-only", "certificate-only"])
def test_sni_switch(leaf: trustme.LeafCert, client: ssl.SSLContext, version: ssl.TLSVersion,
                    listener_keys: bool, certificate_keys: bool, resumes: bool) -> None:
    keys = [new_ticket_key()]
    a = sni_setup(leaf, version, listener_keys, certificate_keys, keys)
    b = sni_setup(leaf, version, listener_keys, certificate_keys, keys)
    first = connect(a, client)
    assert not resumed(first)
    assert resumed(connect(b, client, first.session)) is resumes


# -- failures ----------------------------------------------------------------------------------

class _Broken:
    """A key table whose every read raises, as a bug in the callback would."""

    @property
    def current(self) -> tickets._Key:
        raise RuntimeError("ticket key table broken (test)")

    @property
    def by_name(self) -> dict[bytes, tuple[tickets._Key, bool]]:
        raise RuntimeError("ticket key table broken (test)")


def test_a_failing_callback_costs_the_ticket_not_the_handshake(
        leaf: trustme.LeafCert, client: ssl.SSLContext, version: ssl.TLSVersion,
        caplog: pytest.LogCaptureFixture) -> None:
    key = new_ticket_key()
    a = server_context(leaf, version, [key])
    b = server_context(leaf, version, [key])
    session = connect(a, client).session
    getattr(b, tickets._ATTR).table = _Broken()
    with caplog.at_level(logging.ERROR, logger=tickets.__name__):
        h = connect(b, client, session)  # the ticket cannot be read, nor a new one made
    assert not resumed(h)
    assert not h.session.has_ticket
    assert "ticket callback failed" in caplog.text


def test_dead_contexts_leave_nothing_behind(leaf: trustme.LeafCert, client: ssl.SSLContext
                                            ) -> None:
    keys = [new_ticket_key(), new_ticket_key()]
    for _ in range(50):
        server_context(leaf, ssl.TLSVersion.TLSv1_3, keys)
    gc.collect()
    a = server_context(leaf, ssl.TLSVersion.TLSv1_3, keys)
    b = server_context(leaf, ssl.TLSVersion.TLSv1_3, keys)
    assert resumed(connect(b, client, connect(a, client).session))


@pytest.mark.parametrize("name", [v.name for v in VERSIONS])
def test_listener_freed_mid_handshake(name: str) -> None:
    """A connection outlives the Python object of its listener context once the SNI callback
    switched it away; the callback must be gone from the SSL_CTX before the object dies (a
    freed ctypes callback would crash the process, hence the subprocess)."""
    code = ("from tests.proxy.test_tickets import drop_listener_mid_handshake as f; "
            f"print(f({name!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["freed", "resumed"], out.stdout + out.stderr


# -- the subprocess side of test_listener_freed_mid_handshake ----------------------------------

def _memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext,
                      session: ssl.SSLSession | None = None,
                      after_server_flight: Callable[[], None] | None = None
                      ) -> tuple[ssl.SSLSession, bool]:
    """A handshake through memory BIOs, stepped by hand so something can happen between the
    server's first flight (SNI callback done) and its tickets."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=HOST, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    del server  # from here only the SSLObject holds the listener context
    c_done = s_done = False
    for step in range(10):  # a TLS handshake takes 2 round trips; 10 is plenty
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        if step == 0 and after_server_flight is not None:
            after_server_flight()
        c_in.write(s_out.read())
        if c_done and s_done:
            break
    assert c_done and s_done
    s.write(GREETING)
    c_in.write(s_out.read())
    assert c.read(len(GREETING)) == GREETING
    assert c.session is not None
    return c.session, c.session_reused


def drop_listener_mid_handshake(version_name: str) -> str:
    import weakref

    version = ssl.TLSVersion[version_name]
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    key = new_ticket_key()
    listeners = [sni_setup(leaf, version, True, False, [key, new_ticket_key()])]
    gone = weakref.ref(listeners[0])

    def drop() -> None:
        listeners.clear()
        gc.collect()

    session, _ = _memory_handshake(listeners[0], client, after_server_flight=drop)
    freed = "freed" if gone() is None else "alive"
    # The ticket came from the static key (keys[0]) the callback left behind: it still resumes.
    other = sni_setup(leaf, version, True, False, [key])
    _, reused = _memory_handshake(other, client, session)
    return f"{freed} {'resumed' if reused else 'full'}"

