"""Code 11 from the error's type: a CA (acmeclient's fake CA, over real HTTPS) offering only
dns-01 makes the order fail with NoSupportedChallengeError, logged as code 11. Secrets: a full
issuance against Pebble with DEBUG logging captured leaks no private key material, account JWK
private field or admin token into any log; the state directory is 0700 and every key 0600."""

from __future__ import annotations

import logging
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from josepy.jwk import JWK

from acmeclient.crypto import load_private_key
from lbproxy.letsencrypt import Template
from lbproxy.letsencrypt.codes import LeError
from tests.acmeclient.fake_ca import FakeCA as AcmeFakeCA
from tests.e2e.le_node import Node, cli, config
from tests.support.pebble import PebbleInstance, free_port


class DnsOnlyCA(AcmeFakeCA):
    async def new_order(self, request: web.Request) -> web.Response:
        resp = await super().new_order(request)
        for a in self._authzs.values():
            for c in a["challenges"]:
                c["type"] = "dns-01"
        return resp


@pytest.fixture
async def dns_only(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    tls = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.issue_cert("127.0.0.1").configure_cert(ctx)
    bundle = tmp_path / "ca.pem"
    tls.cert_pem.write_to_path(str(bundle))
    ca = DnsOnlyCA(http_port=free_port())
    runner = web.AppRunner(ca.app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    ca.base = f"https://127.0.0.1:{port}"
    yield ca.base + "/dir", str(bundle)
    await runner.cleanup()


async def test_no_http01_offered_is_code_11(dns_only: tuple[str, str], tmp_path: Path,
                                            upstream: int, pebble: PebbleInstance) -> None:
    url, bundle = dns_only
    node = Node(tmp_path / "n", config(pebble, upstream, free_port()))
    node.root.mkdir()
    await node.start()
    try:
        await node.manager.set_directory(url, bundle)
        await node.manager.register()
        with pytest.raises(LeError) as exc:
            await node.manager.request("x", Template("www.le.test", "web"))
        assert exc.value.code == 11 and "dns-01" in exc.value.text, exc.value
        assert (11, None) in node.manager.log.codes()
        assert node.runtime.current.injections == ()
    finally:
        await node.stop()


def _b64_fields(jwk: dict[str, Any]) -> list[str]:
    return [v for k, v in jwk.items() if k in ("d", "p", "q", "dp", "dq", "qi")]


async def test_full_issuance_logs_no_secret_and_keys_are_private(
        pebble: PebbleInstance, tmp_path: Path, upstream: int,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    https_port = free_port()
    node = Node(tmp_path / "n", config(pebble, upstream, https_port))
    node.root.mkdir()
    await node.start()
    try:
        rc, out = await cli(node, "le", "register", "--email", "o@le.test")
        assert rc == 0, out
        rc, out = await cli(node, "le", "request", "--id", "site", "--cn", "www.le.test",
                            "--vs", "web")
        assert rc == 0, out
    finally:
        await node.stop()
    state = node.state
    cert_key = load_private_key((state / "certs" / "site" / "key-1.pem").read_bytes())
    acct_key = load_private_key((state / "letsencrypt" / "account.key").read_bytes())
    secrets_ = [node.token]
    for k in (cert_key, acct_key):
        secrets_ += _b64_fields(JWK.load(
            k.private_bytes(*_pkcs8())).to_json())  # type: ignore[arg-type]
    assert len(secrets_) >= 3
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "www.le.test" in logged  # the capture did see the issuance
    files = "\n".join(p.read_text() for p in (state / "system-messages.log",
                                              state / "audit.log"))
    for text in (logged, files):
        assert "PRIVATE KEY" not in text
        for s in secrets_:
            assert s not in text
    # modes: state dir and its directories 0700, every key and the token 0600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for p in state.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.is_dir():
            assert mode == 0o700, p
        elif p.name.startswith("key-") or p.name in ("account.key", "admin.token"):
            assert mode == 0o600, p
        else:
            assert mode & 0o077 == 0, p


def _pkcs8() -> tuple[Any, Any, Any]:
    from cryptography.hazmat.primitives import serialization as s
    return s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()
