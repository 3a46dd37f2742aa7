"""The challenge path answers only the exact token of an order in progress, for the right host:
every near miss falls through to the VS's normal routing and never sees the key authorization."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lbproxy.letsencrypt.challenge import RuntimeHttp01Responder
from tests.e2e.le_node import Node, http_get
from tests.support.lbconfig import config_head
from tests.support.pebble import free_port

NORMAL = b"hello from the real server"


def _config(port: int, upstream: int) -> str:
    return config_head() + f"""
[[vs]]
name = "web"
listen = "127.0.0.1:{port}"
  [[vs.subvs]]
  name = "app"
  rules = ["default"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "127.0.0.1:{upstream}" }} ]
"""


@pytest.fixture
async def node(tmp_path: Path, upstream: int) -> AsyncIterator[tuple[Node, int]]:
    port = free_port()
    n = Node(tmp_path / "n", _config(port, upstream))
    n.root.mkdir()
    await n.start()
    yield n, port
    await n.stop()


async def test_only_the_exact_token_for_the_right_host_is_answered(
        node: tuple[Node, int]) -> None:
    n, port = node
    token_a = secrets.token_urlsafe(32)  # 43 base64url characters, like a CA's
    token_b = secrets.token_urlsafe(32)
    ka_a, ka_b = f"{token_a}.thumbprintA", f"{token_b}.thumbprintB"
    responder = RuntimeHttp01Responder(n.runtime, "c", {"a.le.test": "web", "b.le.test": "web"},
                                       n.manager.journal)
    await responder.present("a.le.test", token_a, ka_a)
    await responder.present("b.le.test", token_b, ka_b)
    base = "/.well-known/acme-challenge/"

    # the exact ones (the Host header's case and an explicit port do not matter)
    for host, token, ka in (("a.le.test", token_a, ka_a), ("b.le.test", token_b, ka_b),
                            ("A.LE.test", token_a, ka_a), (f"a.le.test:{port}", token_a, ka_a)):
        status, body, head = await http_get("127.0.0.1", port, host, base + token)
        assert (status, body) == (200, ka.encode()), (host, head)
        assert b"text/plain" in head.lower()

    pct = "".join(f"%{ord(c):02X}" for c in token_a[:2]) + token_a[2:]
    misses = {
        "wrong token": ("a.le.test", base + secrets.token_urlsafe(32)),
        "token prefix": ("a.le.test", base + token_a[:-1]),
        "token suffix": ("a.le.test", base + token_a + "x"),
        "token of another order's host": ("a.le.test", base + token_b),
        "right token, another host": ("evil.le.test", base + token_a),
        "right token, host suffix": ("a.le.test.evil", base + token_a),
        "right token, no host match (IP)": ("127.0.0.1", base + token_a),
        "query string": ("a.le.test", base + token_a + "?x=1"),
        "trailing slash": ("a.le.test", base + token_a + "/"),
        "percent-encoded token": ("a.le.test", base + pct),
        "percent-encoded slash": ("a.le.test", base.rstrip("/") + "%2F" + token_a),
        "dot segment": ("a.le.test", base + "./" + token_a),
        "double slash": ("a.le.test", "/" + base + token_a),
        "upper-cased token": ("a.le.test", base + token_a.upper()),
        "upper-cased path": ("a.le.test", base.upper() + token_a),
        "no token": ("a.le.test", base),
        "no token, no slash": ("a.le.test", base.rstrip("/")),
        "token as a fragment": ("a.le.test", base + "#" + token_a),
    }
    for what, (host, path) in misses.items():
        if what == "upper-cased token" and token_a.upper() == token_a:
            continue
        status, body, head = await http_get("127.0.0.1", port, host, path)
        assert ka_a.encode() not in body and ka_b.encode() not in body, (what, head, body)
        assert (status, body) == (200, NORMAL), (what, head, body)

    # the order ends: the exact token is no longer special either
    await responder.cleanup_all()
    status, body, _ = await http_get("127.0.0.1", port, "a.le.test", base + token_a)
    assert (status, body) == (200, NORMAL)
    assert n.runtime.current.injections == () and await n.manager.journal.entries() == []
