"""Every LoadMaster code that Pebble, a bad config or fault injection can provoke lands in the
System Message File with its number: 3 (the CA unreachable, or its TLS certificate not trusted),
4, 5, 6 (register, and upload-key without --replace), 7, 8, 12, 13, 16, 17.1-3, 20-25; every line
in LoadMaster's shape and the CLI's message ending in the code. Also: declared certificates
(config file), restart after a crash mid-order, `vs convert`."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from josepy.jwk import JWKEC

from acmeclient import AcmeClient, CsrSubject
from acmeclient.crypto import PrivateKey, generate_key, private_key_to_pem
from lbproxy.config import load_file, parse_config
from lbproxy.config.model import Address, CertificateRequest, RealServer
from lbproxy.letsencrypt.issuer import AcmeClientLike
from tests.e2e.le_node import Node, add_a_record, cli, config
from tests.support.pebble import PebbleInstance, free_port


@pytest.fixture
async def node(pebble: PebbleInstance, tmp_path: Path, upstream: int,
               boot: tuple[bytes, bytes]) -> AsyncIterator[Node]:
    n = Node(tmp_path / "n", config(pebble, upstream, free_port()), bootstrap=boot)
    n.root.mkdir()
    await n.start()
    yield n
    await n.stop()


LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 lbtest Acme: \S.*")


def codes(node: Node) -> list[tuple[int, int | None]]:
    return node.manager.log.codes()


def assert_loadmaster_lines(node: Node) -> None:
    """+00:00 timestamps; a code only at the end of a line, as `(code: N)`."""
    for ln in node.manager.log.messages_path.read_text().splitlines():
        assert LINE.fullmatch(ln), ln
        assert "(code:" not in ln or (re.search(r"\(code: \d+\)$", ln)
                                      and ln.count("(code:") == 1), ln


async def expect(node: Node, code: int, *argv: str, sub: int | None = None) -> str:
    before = len(codes(node))
    rc, out = await cli(node, *argv)
    assert rc in (1, 4), out  # 4: refused (a 4xx answer), 1: failed (5xx)
    # the CLI's message ends in LoadMaster's code, nothing after it (no HTTP status)
    assert out.rstrip("\n").endswith(f"(code: {code})"), out
    if sub is not None:
        assert f", sub-code {sub} (code: {code})" in out, out
    assert (code, sub) in codes(node)[before:], codes(node)[before:]
    assert_loadmaster_lines(node)
    return out


async def register(node: Node) -> None:
    rc, out = await cli(node, "le", "register")
    assert rc == 0, out


async def test_account_and_directory_codes(node: Node, pebble: PebbleInstance,
                                           tmp_path: Path) -> None:
    # 8: no account yet
    await expect(node, 8, "le", "request", "--id", "x", "--cn", "www.le.test", "--vs", "web")
    # 3: the CA cannot be reached; or its TLS certificate is not trusted (Pebble's, without
    # its CA bundle): a failure reaching the CA, as LoadMaster's 3, not 5 (a directory answer)
    await expect(node, 3, "le", "set-directory", f"https://127.0.0.1:{free_port()}/dir")
    out = await expect(node, 3, "le", "set-directory", pebble.directory_url, "--ca-bundle", "")
    assert "CERTIFICATE_VERIFY_FAILED" in out, out
    assert node.manager.settings.ca_bundle == pebble.ca_bundle  # a refusal changes nothing
    # 5: something that is not a directory (Pebble's management root certificate, PEM)
    await expect(node, 5, "le", "set-directory", pebble.management_url + "/roots/0")
    await expect(node, 5, "le", "set-directory", "http://127.0.0.1/dir")
    # 7: an unusable key upload; 8: a good key the CA does not know
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    await expect(node, 7, "le", "upload-key", str(junk))
    unknown = tmp_path / "unknown.pem"
    unknown.write_bytes(private_key_to_pem(generate_key()))
    await expect(node, 8, "le", "upload-key", str(unknown))
    # register, then 6 on a second registration
    await register(node)
    await expect(node, 6, "le", "register")
    # an encrypted PEM and certbot's JWK of an existing account link it (on a fresh node)
    assert node.manager.account is not None
    key = node.manager.account.key
    enc = tmp_path / "enc.pem"
    enc.write_bytes(private_key_to_pem(key, b"secret pass"))
    pw = tmp_path / "pw"
    pw.write_text("secret pass\n")
    jwk = tmp_path / "private_key.json"
    jwk.write_text(json.dumps(JWKEC(key=key).to_json()))
    url = node.manager.account.url
    # 6: upload-key over the linked account, unless --replace
    out = await expect(node, 6, "le", "upload-key", str(jwk))
    assert "--replace" in out
    rc, out = await cli(node, "le", "upload-key", str(jwk), "--replace")
    assert rc == 0 and f"Account ID:    {url}" in out, out
    for argv in (["upload-key", str(enc), "--passphrase-file", str(pw)], ["upload-key", str(jwk)]):
        node.manager.account = None
        rc, out = await cli(node, "le", *argv)
        assert rc == 0 and f"Account ID:    {url}" in out, out
    # 4: the CA answers non-2xx (a deactivated account may not order)
    async with AcmeClient(pebble.directory_url, key, account_url=url,
                          ca_bundle=pebble.ca_bundle) as c:
        await c.deactivate_account()
    out = await expect(node, 4, "le", "request", "--id", "x", "--cn", "www.le.test",
                       "--vs", "web")
    assert "unauthorized" in out or "HTTP 4" in out
    assert_loadmaster_lines(node)
    lines = node.manager.log.messages_path.read_text().splitlines()
    assert all(" lbtest Acme: " in ln for ln in lines)
    assert "BEGIN" not in node.manager.log.messages_path.read_text()


async def test_order_codes(node: Node, pebble: PebbleInstance) -> None:
    await register(node)
    # 16: a SAN without its VS; 17.1: a VS that does not exist
    st, ans = await node.api("POST", "/api/le/certs", {
        "id": "m", "common_name": "www.le.test", "vs": "web", "sans": [{"name": "a.le.test"}]})
    assert st == 400 and ans["code"] == 16
    await expect(node, 17, "le", "request", "--id", "m", "--cn", "www.le.test", "--vs", "nope",
                 sub=1)
    # 13: validation fails (the name resolves to an address where nothing listens)
    add_a_record(pebble, "lost.le.test", "127.0.0.9")
    out = await expect(node, 13, "le", "request", "--id", "lost", "--cn", "lost.le.test",
                       "--vs", "web")
    assert "lost.le.test" in out
    assert '"type": "urn:ietf:params:acme:error:' in node.manager.log.messages_path.read_text()
    # 20-25: each step of building the challenge SubVS and rule, by fault injection
    for code in (20, 21, 22, 23, 24, 25):
        node.manager.fault_codes = {code}
        await expect(node, code, "le", "request", "--id", f"f{code}", "--cn", "www.le.test",
                     "--vs", "web")
        assert node.runtime.current.injections == ()
    node.manager.fault_codes = set()
    assert await node.manager.journal.entries() == []
    # 17.2 and 17.3 at renewal: the stored VS deleted, or no longer eligible
    rc, out = await cli(node, "le", "request", "--id", "c17", "--cn", "shop.le.test",
                        "--vs", "web2")
    assert rc == 0, out
    cfg = node.config
    web2 = cfg.vs_by_name("web2")
    assert web2 is not None
    upstream = Address("127.0.0.1", free_port())
    ineligible = dataclasses.replace(web2, subvs=(), real_servers=(RealServer(upstream),),
                                      content_switching=False)
    await node.runtime.set_config(dataclasses.replace(cfg, virtual_services=tuple(
        ineligible if v.name == "web2" else v for v in cfg.virtual_services)))
    await expect(node, 17, "le", "renew", "c17", sub=3)
    rc, out = await cli(node, "le", "list")
    assert "VS not eligible for challenges: VS 'web2'" in out and "code 17" in out
    await node.runtime.set_config(dataclasses.replace(cfg, virtual_services=tuple(
        v for v in cfg.virtual_services if v.name != "web2")))
    await expect(node, 17, "le", "renew", "c17", sub=2)
    view = node.manager.view("c17")
    assert view["status"] == "backoff" and view["last_code"] == 17
    assert view["next_attempt"] > view["not_before"]
    # `vs convert` makes a VS with Real Servers eligible, and keeps it in the config file
    path = node.root / "lbproxy.toml"
    text = path.read_text()
    start = text.index('name = "web2"')
    web2 = text[start:text.index("[[vs]]", start)]
    path.write_text(text.replace(web2, web2[:web2.index("  [[vs.subvs]]")]
                                 + f'real_servers = [ {{ address = "{upstream}" }} ]\n\n'))
    await node.runtime.set_config(load_file(path, to_run=True))
    rc, out = await cli(node, "vs", "convert", "web2")
    assert rc == 0 and 'name = "web2-rs"' in out, out
    snippet = out[out.index("[[vs.subvs]]"):]
    assert "127.0.0.1:" in snippet
    converted = node.config.vs_by_name("web2")
    assert converted is not None and converted.real_servers == ()
    assert converted.subvs[0].real_servers == (RealServer(upstream),)
    assert load_file(path, to_run=True).vs_by_name("web2") == converted
    rc, out = await cli(node, "le", "renew", "c17")
    assert rc == 0, out


class UnrequestedNameClient:
    """Fault injection: a CA that sends an authorization for a name nobody requested."""

    def __init__(self, inner: AcmeClient) -> None:
        self.inner = inner
        self.account_url = inner.account_url

    async def directory(self) -> Any:
        return await self.inner.directory()

    async def new_account(self, **kw: Any) -> Any:
        return await self.inner.new_account(**kw)

    async def obtain_certificate(self, names: Sequence[str], cert_key: PrivateKey,
                                 responder: Any, *, subject: CsrSubject | None = None,
                                 replaces: str | None = None) -> str:
        await responder.present("evil.le.test", "A" * 43, "A" * 43 + ".x")
        raise AssertionError("unreachable")

    async def fetch_renewal_info(self, cert_pem_or_id: str) -> Any:
        return None

    async def close(self) -> None:
        await self.inner.close()


async def test_unrequested_authorization_is_code_12(node: Node) -> None:
    await register(node)
    original = node.manager.client_factory

    def faulty(url: str, key: PrivateKey, acct: str | None, bundle: str | None) -> AcmeClientLike:
        return UnrequestedNameClient(AcmeClient(url, key, account_url=acct, ca_bundle=bundle))

    node.manager.client_factory = faulty
    await expect(node, 12, "le", "request", "--id", "e", "--cn", "www.le.test", "--vs", "web")
    node.manager.client_factory = original


async def test_declared_certificates_and_crash_restart(node: Node, pebble: PebbleInstance,
                                                        upstream: int) -> None:
    await register(node)
    # a certificate declared in the config file is requested automatically
    cfg = dataclasses.replace(node.config, certificates=(
        CertificateRequest("decl", "www.le.test", "web", sans=(("api.le.test", "web"),)),))
    await node.runtime.set_config(cfg)
    await node.manager.sync_config(cfg)
    await node.manager.run_due()
    await node.manager.wait_idle()
    info = node.store.require("decl")
    assert info.managed_by == "letsencrypt" and set(info.names) == {"www.le.test", "api.le.test"}
    assert node.manager.view("decl")["source"] == "config"
    # removed from the file: no longer renewed, still in the store
    await node.manager.sync_config(dataclasses.replace(cfg, certificates=()))
    assert node.manager.view("decl")["auto_renew"] is False
    assert node.manager.view("decl")["next_attempt"] == ""
    # a crash mid-order leaves a journal entry: the restart removes it and retries cleanly
    await node.manager.journal.add("decl2", "web", "acme-leftover")
    await node.stop()
    text = node.config_text.replace("[[vs]]", """[[certificate]]
id = "decl2"
common_name = "shop.le.test"
vs = "web2"

[[vs]]""", 1)
    parse_config(text, base=node.root)  # the loader accepts it
    node.config_text = text
    await node.start()
    assert await node.manager.journal.entries() == []
    await node.manager.run_due()
    await node.manager.wait_idle()
    assert node.store.require("decl2").names == ("shop.le.test",)
