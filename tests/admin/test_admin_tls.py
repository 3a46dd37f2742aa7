"""The admin API over HTTPS with the certificate assigned to "admin": at start and at run time,
a replaced certificate seen by the next handshake on the same listener, unassign back to plain
HTTP, and the CLI reaching the HTTPS API with verification on."""

from __future__ import annotations

import asyncio
import io
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from lbproxy.admin import create_app, load_or_create_token, start_admin
from lbproxy.admin.cli import main
from lbproxy.admin.server import AdminServer, AdminTLS
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.model import Address
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import RuntimeStore
from tests.admin.conftest import CONFIG, STATS
from tests.certs.helpers import DEADLINE, client_context, handshake, issue, serial_of


@dataclass
class Env:
    ca: trustme.CA
    state: Path
    store: CertStore
    token: str
    app_args: dict[str, Any]
    session: aiohttp.ClientSession
    server: AdminServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self) -> AdminServer:
        app = create_app(**self.app_args)
        self.server = await start_admin(app, Address("127.0.0.1", 0), tls=AdminTLS(self.store))
        return self.server

    async def call(self, scheme: str, method: str, path: str, body: Any = None,
                   token: bool = True) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        ssl_ctx: ssl.SSLContext | bool = client_context(self.ca) if scheme == "https" else False
        async with self.session.request(method, f"{scheme}://127.0.0.1:{self.port}{path}",
                                        json=body, headers=headers, ssl=ssl_ctx) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    ca = trustme.CA()
    state = tmp_path / "state"
    runtime = RuntimeStore(parse_config(CONFIG, base=tmp_path))
    store = CertStore(state, usage=config_usage(lambda: runtime.current.config))
    store.import_pem("base", *issue(ca, "shop.example.com"))
    tls = TLSContexts(store, runtime.current.effective_services())
    token = load_or_create_token(state)
    args = {"runtime": runtime, "dataplane_stats": lambda: STATS, "store": store, "tls": tls,
            "token": token}
    # Fresh connections per request: a kept-alive connection would outlive a listener switch.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE),
                                     connector=connector) as session:
        e = Env(ca, state, store, token, args, session)
        yield e
        if e.server is not None:
            await e.server.close()


async def test_assigned_at_start_serves_https_with_that_certificate(env: Env) -> None:
    chain, key = issue(env.ca, "127.0.0.1", "localhost")
    env.store.import_pem("adm", chain, key)
    env.store.assign("adm", "admin")
    server = await env.start()
    assert server.scheme == "https"
    assert await handshake(server.port, "localhost", client_context(env.ca)) == serial_of(chain)
    status, body = await env.call("https", "GET", "/api/status", token=False)
    assert status == 401 and body["error"] == "missing bearer token"
    status, _ = await env.call("https", "GET", "/api/status")
    assert status == 200
    # Plain HTTP on the TLS port gets no API answer.
    with pytest.raises(aiohttp.ClientError):
        await env.call("http", "GET", "/api/status")


async def test_tls_is_the_data_plane_policy(env: Env) -> None:
    env.store.import_pem("adm", *issue(env.ca, "127.0.0.1"))
    env.store.assign("adm", "admin")
    tls = AdminTLS(env.store)
    ctx = tls.context()
    assert ctx is tls.context() and tls.serving() == "adm"
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    server = await env.start()
    tls12 = client_context(env.ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    _reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", server.port, ssl=tls12, server_hostname="127.0.0.1"), DEADLINE)
    try:
        ssl_obj = writer.get_extra_info("ssl_object")
        assert ssl_obj.version() == "TLSv1.2" and ssl_obj.selected_alpn_protocol() == "http/1.1"
    finally:
        writer.close()


async def test_assign_replace_unassign_at_run_time(env: Env) -> None:
    server = await env.start()
    assert server.scheme == "http"
    status, _ = await env.call("http", "GET", "/api/status")
    assert status == 200
    chain1, key1 = issue(env.ca, "127.0.0.1")
    env.store.import_pem("adm", chain1, key1)

    # First assignment: answered on the old connection, then the listener speaks HTTPS.
    status, body = await env.call("http", "POST", "/api/certs/adm/assign", {"target": "admin"})
    assert status == 200 and body["assigned"] == "adm"
    port = server.port
    assert server.scheme == "https"
    assert await handshake(port, None, client_context(env.ca)) == serial_of(chain1)
    status, _ = await env.call("https", "GET", "/api/certs", token=False)
    assert status == 401

    # Replace (renewal) through the API: the next handshake on the same listener sees it.
    chain2, key2 = issue(env.ca, "127.0.0.1")
    status, _ = await env.call("https", "PUT", "/api/certs/adm",
                               {"cert": chain2.decode(), "key": key2.decode()})
    assert status == 200
    assert server.port == port and server.scheme == "https"
    assert await handshake(port, None, client_context(env.ca)) == serial_of(chain2)
    # A replacement written to the store directly (e.g. the ACME manager) is picked up too.
    chain3, key3 = issue(env.ca, "127.0.0.1")
    env.store.import_pem("adm", chain3, key3, replace=True)
    assert await handshake(port, None, client_context(env.ca)) == serial_of(chain3)

    # A second certificate assigned later is served instead (the newest assignment wins).
    chain4, key4 = issue(env.ca, "127.0.0.1")
    env.store.import_pem("adm2", chain4, key4)
    status, _ = await env.call("https", "POST", "/api/certs/adm2/assign", {"target": "admin"})
    assert status == 200
    assert await handshake(port, None, client_context(env.ca)) == serial_of(chain4)
    status, _ = await env.call("https", "POST", "/api/certs/adm2/unassign", {"target": "admin"})
    assert status == 200 and server.scheme == "https"
    assert await handshake(port, None, client_context(env.ca)) == serial_of(chain3)

    # Last unassignment: back to plain HTTP on the same port.
    status, _ = await env.call("https", "POST", "/api/certs/adm/unassign", {"target": "admin"})
    assert status == 200
    assert server.scheme == "http" and server.port == port
    status, body = await env.call("http", "GET", "/api/certs")
    assert status == 200 and {c["id"] for c in body["certificates"]} >= {"adm", "adm2", "base"}
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await handshake(port, None, client_context(env.ca))


async def test_cli_reaches_https_api_with_verification(env: Env, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    env.store.import_pem("adm", *issue(env.ca, "127.0.0.1"))
    env.store.assign("adm", "admin")
    server = await env.start()
    url = f"https://127.0.0.1:{server.port}"
    flags = ["--admin", url, "--token-file", str(env.state / "admin.token")]

    def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main([*argv, *flags], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    # Not trusted (the system store does not know this CA): refused, never downgraded.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    code, _, err = await asyncio.to_thread(cli, "cert", "list")
    assert code == 3 and "CERTIFICATE_VERIFY_FAILED" in err  # 3: cannot reach the API
    # Trusting the admin certificate's CA (SSL_CERT_FILE) makes it work.
    ca_file = tmp_path / "ca.pem"
    env.ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    code, out, err = await asyncio.to_thread(cli, "cert", "list")
    assert code == 0, err
    assert "adm" in out and "admin" in out
    # Unassigning through the CLI answers over HTTPS, then the API is plain HTTP again.
    code, out, err = await asyncio.to_thread(cli, "cert", "assign", "adm", "admin", "--remove")
    assert (code, out) == (0, "adm unassigned from admin\n"), err
    assert server.scheme == "http"
    flags[1] = f"http://127.0.0.1:{server.port}"
    code, out, err = await asyncio.to_thread(cli, "status")
    assert code == 0, err


async def test_app_starts_admin_on_https_when_assigned(tmp_path: Path) -> None:
    from lbproxy.app import App
    from lbproxy.config import load_file
    from tests.test_app import config_text, free_port

    ca = trustme.CA()
    chain, key = issue(ca, "127.0.0.1")
    store = CertStore(tmp_path / "state")
    store.import_pem("adm", chain, key)
    store.assign("adm", "admin")
    port, admin_port = free_port(), free_port()
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, free_port()).replace(
        "[admin]\nenabled = false", f'[admin]\nlisten = "127.0.0.1:{admin_port}"'))
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        assert app.admin is not None and app.admin.scheme == "https"
        assert await handshake(admin_port, None, client_context(ca)) == serial_of(chain)
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as s:
            async with s.get(f"https://127.0.0.1:{admin_port}/api/status", ssl=client_context(ca),
                             headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
    finally:
        await app.stop()
