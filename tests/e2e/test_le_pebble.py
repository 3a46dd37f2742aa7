"""Let's Encrypt end to end against a real Pebble whose httpPort is an lbproxy VS: register,
request (CN + 2 SANs on two VSs), challenge SubVS seen while pending and gone after, SNI serving
verified with Pebble's root, the same through an HTTP Redirect VS, a forced renewal under HTTPS
load with zero failures, a restart with no new order, backup/restore onto a second instance."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from lbproxy.runtime import Runtime
from tests.e2e.le_node import Node, cli, config, http_get, https_get, trust
from tests.support.pebble import PebbleInstance, free_port

LOAD_SECONDS = 30.0  # upper bound of the HTTPS load loop around a renewal
LOAD_MAX_REQUESTS = 5000


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_certificate_story(pebble: PebbleInstance, tmp_path: Path, upstream: int,
                                 boot: tuple[bytes, bytes], workers: int) -> None:
    """With workers = 2 the data plane runs in two worker processes: Pebble's validations, the
    HTTPS handshakes and the load reach either, through SO_REUSEPORT."""
    https_port = free_port()
    text = config(pebble, upstream, https_port)
    node = Node(tmp_path / "one", text, bootstrap=boot, workers=workers)
    node.root.mkdir()
    await node.start()
    try:
        await story(node, pebble, tmp_path, https_port, text, boot)
    finally:
        await node.stop()


async def story(node: Node, pebble: PebbleInstance, tmp_path: Path, https_port: int,
                text: str, boot: tuple[bytes, bytes]) -> None:
    ctx = trust(pebble)
    # -- register (the directory comes from the config file; set it again through the CLI)
    code, out = await cli(node, "le", "set-directory", pebble.directory_url,
                          "--ca-bundle", pebble.ca_bundle)
    assert code == 0, out
    code, out = await cli(node, "le", "register", "--email", "ops@le.test")
    assert code == 0, out
    account_url = node.manager.account.url if node.manager.account else ""
    assert account_url and f"Account ID:    {account_url}" in out
    code, out = await cli(node, "le", "eligible-vs")
    assert code == 0 and "web2" in out and "secure3" in out and "redir" not in out

    # -- request: CN + 2 SANs on two different VSs; watch the challenge SubVSs and rules
    pending_views: list[dict[str, Any]] = []

    async def look(rt: Runtime) -> None:
        for vs in ("web", "web2"):
            status, view = await node.api("GET", f"/api/vs/{vs}")
            assert status == 200
            pending_views.append(view)
    node.on_inject.append(look)
    code, out = await cli(node, "le", "request", "--id", "site", "--cn", "www.le.test",
                          "--vs", "web", "--san", "api.le.test=web", "--san", "shop.le.test=web2",
                          "--country", "DE", "--company", "LB Test")
    node.on_inject.clear()
    assert code == 0, out
    assert "HTTP Challenge VS(s): www.le.test: web, api.le.test: web, shop.le.test: web2" in out
    injected = [i for rt in node.seen for i in rt.injections]
    assert {i.vs for i in injected} == {"web", "web2"}
    for i in injected:
        assert i.subvs.real_servers == () and i.subvs.not_available.status == 200
        assert i.subvs.not_available.content_type == "text/plain"
        assert "challenge/" in i.rule.pattern and i.rule.include_host
    shown = str(pending_views)
    # visible in `lbproxy vs show` (GET /api/vs/NAME): the SubVS, and its rule first
    assert "acme-" in shown
    firsts = [v["rules"][0] for v in pending_views if v["rules"][0]["injected"]]
    assert firsts and all(r["precedence"] == 1 and r["rule"].startswith("acme-")
                          for r in firsts)
    assert node.runtime.current.injections == ()  # gone after
    assert "acme-" not in str((await node.api("GET", "/api/vs/web"))[1])
    assert await node.manager.journal.entries() == []

    # -- served over SNI by the HTTPS VS, verified with Pebble's root only
    status, body, serial1 = await https_get("127.0.0.1", https_port, "shop.le.test", ctx)
    assert (status, body) == (200, b"hello from the real server")
    for name in ("www.le.test", "api.le.test"):
        assert (await https_get("127.0.0.1", https_port, name, ctx))[2] == serial1
    code, out = await cli(node, "le", "list")
    assert code == 0 and "site" in out and "valid" in out and "secure" in out

    # -- the generic store refuses to touch it; LE delete refuses while in use
    st, ans = await node.api("DELETE", "/api/certs/site")
    assert st == 409 and "letsencrypt" in ans["error"]
    code, out = await cli(node, "le", "delete", "site")
    assert code == 4 and "in use" in out  # 4: refused (409)

    # -- through an HTTP Redirect VS (port 80 -> the HTTPS VS holding the SubVS)
    code, out = await cli(node, "le", "request", "--id", "rcert", "--cn", "r.le.test",
                          "--vs", "secure3")
    assert code == 0, out
    assert any(i.vs == "secure3" for rt in node.seen for i in rt.injections)
    status, body, _ = await https_get("127.0.0.3", https_port, "r.le.test", ctx)
    assert (status, body) == (200, b"hello from the real server")
    st, _, head = await http_get("127.0.0.3", pebble.http_port, "r.le.test", "/x")
    assert st == 301 and f"https://r.le.test:{https_port}/x".encode() in head

    # -- forced renewal during a bounded HTTPS load loop: 0 failures, new serial seen
    serials: set[int] = set()
    failures: list[str] = []
    done = asyncio.Event()

    async def load() -> int:
        n = 0
        t_end = time.monotonic() + LOAD_SECONDS
        while not done.is_set() and n < LOAD_MAX_REQUESTS and time.monotonic() < t_end:
            try:
                st, _, serial = await https_get("127.0.0.1", https_port, "www.le.test", ctx)
                if st != 200:
                    failures.append(f"status {st}")
                serials.add(serial)
            except Exception as exc:  # any failed request counts
                failures.append(repr(exc))
            n += 1
        return n

    loaders = [asyncio.create_task(load()) for _ in range(4)]
    await asyncio.sleep(0.2)  # let the loop get going before the renewal starts
    code, out = await cli(node, "le", "renew", "site")
    after_renew = node.store.require("site").serial
    # a few more handshakes after the swap
    for _ in range(3):
        serials.add((await https_get("127.0.0.1", https_port, "www.le.test", ctx))[2])
    done.set()
    counts = await asyncio.gather(*loaders)
    assert code == 0, out
    assert failures == [], failures[:5]
    assert sum(counts) > 0
    assert after_renew != serial1 and {serial1, after_renew} <= serials
    assert "renewed: site" in node.manager.log.audit_path.read_text()

    # -- restart: no new order, still served, never waited on the CA
    orders_before = node.manager.orders_placed
    await node.stop()
    t0 = time.monotonic()
    await node.start()
    assert time.monotonic() - t0 < 5.0
    await node.manager.run_due()
    await node.manager.wait_idle()
    assert node.manager.orders_placed == 0 and orders_before >= 3
    assert (await https_get("127.0.0.1", https_port, "api.le.test", ctx))[2] == after_renew

    # -- backup here, restore on a second instance, renew there with the same account
    pw = tmp_path / "pw"
    pw.write_text("a long passphrase\n")
    backup_file = tmp_path / "le-backup.json"
    code, out = await cli(node, "backup", "-o", str(backup_file), "--passphrase-file", str(pw),
                          "--certs", "--vs")
    assert code == 0, out
    assert b"BEGIN" not in backup_file.read_bytes()
    await node.stop()
    second = Node(tmp_path / "two", text, bootstrap=boot)
    second.root.mkdir()
    await second.start()
    try:
        code, out = await cli(second, "restore", str(backup_file), "--passphrase-file", str(pw),
                              "--certs")
        assert code == 0, out
        assert second.manager.account is not None
        assert second.manager.account.url == account_url
        code, out = await cli(second, "le", "renew", "site")
        assert code == 0, out
        new_serial = second.store.require("site").serial
        assert new_serial != after_renew
        assert (await https_get("127.0.0.1", https_port, "www.le.test", ctx))[2] == new_serial
        assert "account registered" not in second.manager.log.audit_path.read_text()
    finally:
        await second.stop()
        await node.start()  # the fixture's finally stops it again
