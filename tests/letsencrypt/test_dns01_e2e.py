"""dns-01 end to end through lbproxy itself: the composition root (`App`, as `lbproxy run` builds
it), its admin API and CLI, its config file and reloads, against a real Pebble whose validator
resolves every name through a real Knot DNS server that lbproxy updates with a TSIG key.

- A wildcard certificate (`*.example.test` + `example.test`) by dns-01 is issued, stored, served
  on an HTTPS VS to a client asking for `foo.example.test`, and no `_acme-challenge` record is
  left; a `[[certificate]]` wildcard with challenge = "dns-01" added by a reload is issued too;
  the template keeps dns-01 across a restart, so a renewal through the API proves it the same
  way; a reload that changes `[letsencrypt.dns]` leaves the settings the API set alone.
- No `[letsencrypt.dns]` (104), a TSIG secret file that is missing (104, naming the file) or
  that the server rejects (105, BADSIG) fails `le request` with its code in the CLI, the API
  answer and the System Message File, before any order reaches Pebble (new-order requests
  counted on the real client); the next order after a reload that fixes the section uses the
  new one. These requests name no VS (`--vs` left out, no `vs` in the API body): dns-01 needs
  none, and the certificate is issued and stored without one.

A wildcard asked with http-01 or tls-alpn-01 is refused before ordering in
tests/letsencrypt/test_tls_alpn01.py (test_refused_before_any_order); the loader's side of
`challenge` (file:line, `lbproxy check`) is tests/config/test_certificate_challenge.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbproxy.admin import le_cli
from lbproxy.certs import CertStore
from tests.e2e.le_node import https_get, trust
from tests.support.acme_counting import CountingFactory
from tests.support.knot import KnotInstance, knot_or_skip, start_knot
from tests.support.lbconfig import config_head, https_vs
from tests.support.opsapp import Running, running
from tests.support.pebble import PebbleInstance, free_port, pebble_or_skip, start_pebble
from tests.support.tlsclient import bootstrap_certificate

knot_or_skip()

RECORD = "_acme-challenge.example.test."
ORDER_STEP = 120.0   # one order on a loaded 2-core machine (Pebble with VA_NOSLEEP: seconds)


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotInstance]:
    with start_knot(tmp_path_factory.mktemp("knot")) as k:
        yield k


@pytest.fixture(scope="module")
def pebble(knot: KnotInstance, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PebbleInstance]:
    """Pebble whose validator resolves through knot: the dns-01 TXT records lbproxy adds
    there are what it checks."""
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble"), dns_server=knot.dns_address) as p:
        yield p


boot = pytest.fixture(scope="module")(bootstrap_certificate)


def config(pebble: PebbleInstance, knot: KnotInstance, *, admin_port: int, https_port: int,
           secret_file: Path | None, dns_extra: str = "", more: str = "") -> str:
    """The App's config; `secret_file` None: no [letsencrypt.dns] section."""
    dns = knot.config_section(secret_file, dns_extra)
    text = (config_head(admin_port=admin_port, pebble=pebble, top="drain_timeout = 1\n",
                        letsencrypt=dns)
            + https_vs("secure", f"127.0.0.1:{https_port}", ["wild", "decl", "boot"]) + more)
    if secret_file is None:
        text = re.sub(r"\[letsencrypt\.dns\].*?\n\n", "", text, flags=re.S)
        assert "tsig" not in text
    return text


DECLARED = """
[[certificate]]
id = "decl"
common_name = "*.example.test"
vs = "secure"
challenge = "dns-01"
"""


async def cli(r: Running, *argv: str) -> tuple[int, str]:
    """`lbproxy ARGV` against the running App's admin API (le_cli is synchronous: a thread)."""
    out, err = io.StringIO(), io.StringIO()
    args = [*argv, "--admin", r.admin_url, "--token-file", str(r.app.state_dir / "admin.token")]
    async with asyncio.timeout(ORDER_STEP):
        code = await asyncio.to_thread(le_cli.main, args, out=out, err=err)
    return code, out.getvalue() + err.getvalue()


async def reload(r: Running, text: str) -> None:
    r.path.write_text(text)
    status, body = await r.api("POST", "/api/reload")
    assert status == 200, body


def coded_lines(r: Running, code: int) -> list[str]:
    """The System Message File's lines ending in `(code: N)`."""
    path = r.app.state_dir / "system-messages.log"
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if line.endswith(f"(code: {code})")]


async def logged(r: Running, code: int, text: str) -> list[str]:
    """`coded_lines` holding `text`, once there is one (or [] after 5 s): the order's task
    writes its line when it ends, which may be just after the API has answered."""
    for _ in range(250):   # 250 x 20 ms
        if lines := [ln for ln in coded_lines(r, code) if text in ln]:
            return lines
        await asyncio.sleep(0.02)
    return []


def updates(knot: KnotInstance) -> int:
    """Dynamic updates knot applied so far (its log says so once per update)."""
    return knot.log.read_text().count("DDNS, finished")


async def logged_updates(knot: KnotInstance, at_least: int) -> int:
    """`updates(knot)` once it reaches `at_least`, or as it is after 5 s: knot writes its log
    on its own time, after it has answered the update (bounded polling of another process's
    file; there is no event to await)."""
    for _ in range(250):   # 250 x 20 ms
        if updates(knot) >= at_least:
            break
        await asyncio.sleep(0.02)
    return updates(knot)


def names(r: Running, cert_id: str) -> list[str]:
    return sorted(r.app.store.require(cert_id).names)


async def stored(r: Running, cert_id: str) -> None:
    """Wait (bounded) until the certificate store holds `cert_id`: its change callback, not a
    sleep, says when to look."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    r.app.store.watch(lambda: loop.call_soon_threadsafe(changed.set))
    async with asyncio.timeout(ORDER_STEP):
        while r.app.store.get(cert_id) is None:
            await changed.wait()
            changed.clear()


def start(tmp_path: Path, boot: tuple[bytes, bytes], text: str, admin_port: int) -> Any:
    store = CertStore(tmp_path / "state")
    if store.get("boot") is None:
        store.import_pem("boot", *boot)
    return running(tmp_path, text, admin_port=admin_port)


async def test_a_wildcard_by_dns01_is_issued_served_and_renewed_the_same_way(
        pebble: PebbleInstance, knot: KnotInstance, tmp_path: Path,
        boot: tuple[bytes, bytes]) -> None:
    https_port = free_port()
    admin_port = free_port()
    text = config(pebble, knot, admin_port=admin_port, https_port=https_port,
                  secret_file=knot.secret_file)
    before = updates(knot)
    async with start(tmp_path, boot, text, admin_port) as r:
        factory = CountingFactory("new_order")
        r.app.manager.client_factory = factory
        assert (await cli(r, "le", "register", "--email", "ops@example.test"))[0] == 0
        code, out = await cli(r, "le", "renew-period", "20")
        assert code == 0, out

        code, out = await cli(r, "le", "request", "--id", "wild", "--cn", "*.example.test",
                              "--vs", "secure", "--san", "example.test=secure",
                              "--challenge", "dns-01")
        assert code == 0, out
        assert "Challenge:     dns-01" in out
        assert factory.calls == 1
        info = r.app.store.require("wild")
        assert names(r, "wild") == ["*.example.test", "example.test"]
        # lbproxy put the two TXT values in knot and took them away (add + delete, twice, and
        # the no-change check before the order: five updates, which knot may apply, and log,
        # in fewer batches when they come close together; at least an add and a delete)
        assert await logged_updates(knot, before + 2) - before >= 2
        assert knot.txt(RECORD) == set()
        # served on the HTTPS VS for a name under the wildcard
        status, body, serial = await https_get("127.0.0.1", https_port, "foo.example.test",
                                               trust(pebble))
        assert (status, body, serial) == (404, b"nothing here", info.serial)

        # A reload declaring a wildcard [[certificate]] by dns-01, and changing
        # [letsencrypt.dns] (read at the next order): the certificate is issued, and the renew
        # period the API set is not reset by the section's change.
        await reload(r, config(pebble, knot, admin_port=admin_port, https_port=https_port,
                               secret_file=knot.secret_file, dns_extra="ttl = 30",
                               more=DECLARED))
        assert r.app.config.letsencrypt.dns is not None
        assert r.app.config.letsencrypt.dns.ttl == 30
        await stored(r, "decl")
        assert names(r, "decl") == ["*.example.test"]
        assert r.app.manager.entries["decl"].template.challenge == "dns-01"
        assert r.app.manager.settings.renew_period_days == 20
        assert factory.calls == 2
        assert knot.txt(RECORD) == set()
        first_serial = info.serial

    # A restart: the template on disk keeps dns-01, and a renewal through the API proves the
    # wildcard the same way (Pebble gives a wildcard by dns-01 only).
    admin_port = free_port()
    text = config(pebble, knot, admin_port=admin_port, https_port=https_port,
                  secret_file=knot.secret_file, more=DECLARED)
    async with start(tmp_path, boot, text, admin_port) as r:
        assert r.app.manager.entries["wild"].template.challenge == "dns-01"
        before = updates(knot)
        status, view = await r.api("GET", "/api/le/certs/wild")
        assert status == 200 and view["challenge"] == "dns-01"
        code, out = await cli(r, "le", "renew", "wild")
        assert code == 0, out
        assert "Challenge:     dns-01" in out
        renewed = r.app.store.require("wild")
        assert renewed.serial != first_serial
        assert await logged_updates(knot, before + 2) - before >= 2
        assert knot.txt(RECORD) == set()
        _, _, serial = await https_get("127.0.0.1", https_port, "bar.example.test",
                                       trust(pebble))
        assert serial == renewed.serial


async def test_a_key_the_server_rejects_places_no_order(
        pebble: PebbleInstance, knot: KnotInstance, tmp_path: Path,
        boot: tuple[bytes, bytes]) -> None:
    https_port = free_port()
    admin_port = free_port()
    missing = tmp_path / "keys" / "missing.key"
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")

    def text(secret_file: Path | None) -> str:
        return config(pebble, knot, admin_port=admin_port, https_port=https_port,
                      secret_file=secret_file)

    # no --vs: dns-01 uses no VS
    request = ("le", "request", "--id", "wild", "--cn", "*.example.test", "--challenge", "dns-01")
    async with start(tmp_path, boot, text(None), admin_port) as r:
        factory = CountingFactory("new_order")
        r.app.manager.client_factory = factory
        assert (await cli(r, "le", "register"))[0] == 0

        # 0. no [letsencrypt.dns] section: 104, saying so, refused with the request (no entry)
        code, out = await cli(r, *request)
        assert code != 0
        assert "(code: 104)" in out and "has no [letsencrypt.dns] section" in out, out
        assert "wild" not in r.app.manager.state.entries

        # 1. the secret file cannot be read: 104, naming the file
        await reload(r, text(missing))
        code, out = await cli(r, *request)
        assert code != 0
        assert "(code: 104)" in out and str(missing) in out, out
        assert "cannot read the TSIG secret" in out
        assert await logged(r, 104, str(missing))

        # 2. a secret the server rejects (reloaded: the next order reads the new section): 105
        await reload(r, text(wrong))
        code, out = await cli(r, *request)
        assert code != 0
        assert "(code: 105)" in out and "BADSIG" in out, out
        (line,) = await logged(r, 105, "BADSIG")
        assert f"TSIG key {knot.update_key.name}" in line and str(knot.port) in line
        secret = wrong.read_text().strip().encode()
        assert secret not in (r.app.state_dir / "system-messages.log").read_bytes()  # never
        # the API answers the same, with the code as a field
        status, body = await r.api("POST", "/api/le/certs", {
            "id": "wild", "common_name": "*.example.test", "challenge": "dns-01"})
        assert (status, body["code"]) == (502, 105), body
        assert re.search(r"answered BADSIG", body["error"])

        assert factory.calls == 0 and r.app.manager.orders_placed == 0
        assert "wild" not in r.app.manager.entries and r.app.store.get("wild") is None
        assert knot.txt(RECORD) == set()

        # 3. the section fixed by a reload: the next order uses it
        await reload(r, text(knot.secret_file))
        code, out = await cli(r, *request)
        assert code == 0, out
        assert "*.example.test: (dns-01: none)" in out
        assert factory.calls == 1
        assert names(r, "wild") == ["*.example.test"]
        assert r.app.manager.entries["wild"].template.vs == ""
        assert knot.txt(RECORD) == set()
