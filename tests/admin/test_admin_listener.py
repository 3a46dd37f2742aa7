"""Where the admin API may serve plain HTTP: a non-loopback `[admin] listen` is refused at load
unless `tls = true` or `insecure = true` (which `lbproxy check` reports as a warning); `tls =
true` refuses to start without a certificate assigned to "admin" and never falls back to HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from lbproxy.__main__ import main as lbproxy_main
from lbproxy.admin import create_app, load_or_create_token, start_admin
from lbproxy.admin.server import AdminServer, AdminTLS
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.loader import config_warnings
from lbproxy.config.model import Address
from lbproxy.errors import ConfigError
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import RuntimeStore
from tests.admin.conftest import CONFIG, STATS
from tests.certs.helpers import DEADLINE, client_context, handshake, issue, serial_of

NOT_LOOPBACK = ["0.0.0.0", "[::]", "192.0.2.10", "10.0.0.1", "admin.example.com",
                "[::ffff:192.0.2.1]", "localhost.example.com"]
LOCAL = Address("127.0.0.1", 0)
LOOPBACK = ["127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LOCALHOST", "[::ffff:127.0.0.1]"]


def admin_section(listen: str, extra: str = "") -> str:
    return f'{CONFIG}\n[admin]\nlisten = "{listen}:8444"\n{extra}\n'


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    return [(p.where, p.message) for p in ei.value.problems]


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_plain_http_off_loopback_is_refused_naming_the_field(host: str) -> None:
    ((where, message),) = problems(admin_section(host))
    assert where == "admin.listen"
    assert "not a loopback address" in message
    assert "tls = true" in message and "insecure = true" in message


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_needs_neither_tls_nor_insecure(host: str) -> None:
    cfg = parse_config(admin_section(host))
    assert not cfg.admin.tls and not cfg.admin.insecure
    assert config_warnings(cfg) == []


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_tls_or_insecure_allows_any_address(host: str) -> None:
    cfg = parse_config(admin_section(host, "tls = true"))
    assert cfg.admin.tls and config_warnings(cfg) == []
    cfg = parse_config(admin_section(host, "insecure = true"))
    assert cfg.admin.insecure
    ((where, message),) = [(w.where, w.message) for w in config_warnings(cfg)]
    assert where == "admin.insecure" and "plain HTTP" in message


def test_a_disabled_admin_api_may_name_any_address() -> None:
    cfg = parse_config(admin_section("0.0.0.0", "enabled = false"))
    assert not cfg.admin.enabled and config_warnings(cfg) == []


@pytest.mark.parametrize(("extra", "where", "fragment"), [
    ("tls = true\ninsecure = true", "admin.insecure", "together with tls"),
    ('tls = "yes"', "admin.tls", "true or false"),
    ("insecure = 1", "admin.insecure", "true or false"),
])
def test_admin_flag_mistakes_are_located(extra: str, where: str, fragment: str) -> None:
    found = problems(admin_section("127.0.0.1", extra))
    assert [w for w, m in found if w == where and fragment in m], found


def test_check_refuses_plain_http_off_loopback(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(admin_section("0.0.0.0"))
    assert lbproxy_main(["check", "-c", str(path)]) == 1
    assert "admin.listen: 0.0.0.0:8444 is not a loopback address" in capsys.readouterr().err


def test_check_reports_insecure_as_a_warning(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(admin_section("0.0.0.0", "insecure = true"))
    assert lbproxy_main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out
    assert (f"warning: {path}:32: admin.insecure: the admin API serves plain HTTP on "
            "0.0.0.0:8444") in out.err
    assert lbproxy_main(["check", "-c", str(path), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] and [w["where"] for w in answer["warnings"]] == ["admin.insecure"]
    path.write_text(admin_section("127.0.0.1"))
    assert lbproxy_main(["check", "-c", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


# -- at start and at run time ---------------------------------------------------------------------

class Rig:
    def __init__(self, tmp_path: Path, extra: str) -> None:
        self.ca = trustme.CA()
        state = tmp_path / "state"
        runtime = RuntimeStore(parse_config(admin_section("127.0.0.1", extra), base=tmp_path))
        self.store = CertStore(state, usage=config_usage(lambda: runtime.current.config))
        self.store.import_pem("base", *issue(self.ca, "shop.example.com"))
        self.token = load_or_create_token(state)
        self.app = create_app(runtime=runtime, dataplane_stats=lambda: STATS, store=self.store,
                              tls=TLSContexts(self.store, runtime.current.effective_services()),
                              token=self.token)
        self.server: AdminServer | None = None

    def admin_cert(self, cert_id: str) -> bytes:
        chain, key = issue(self.ca, "127.0.0.1")
        self.store.import_pem(cert_id, chain, key)
        self.store.assign(cert_id, "admin")
        return chain

    async def start(self, address: Address = LOCAL) -> AdminServer:
        self.server = await start_admin(self.app, address, tls=AdminTLS(self.store))
        return self.server

    async def unassign(self, cert_id: str) -> tuple[int, dict[str, str]]:
        assert self.server is not None
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DEADLINE),
                connector=aiohttp.TCPConnector(force_close=True)) as s, s.post(
                f"https://127.0.0.1:{self.server.port}/api/certs/{cert_id}/unassign",
                json={"target": "admin"}, ssl=client_context(self.ca),
                headers={"Authorization": f"Bearer {self.token}"}) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def rigs() -> AsyncIterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        if r.server is not None:
            await r.server.close()


async def test_tls_true_refuses_to_start_without_an_admin_certificate(
        tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, "tls = true")
    rigs.append(rig)
    with pytest.raises(ConfigError) as ei:
        await rig.start()
    (problem,) = ei.value.problems
    assert problem.where == "admin.tls" and "no certificate is assigned" in problem.message
    assert rig.server is None


async def test_tls_true_keeps_https_when_the_last_admin_certificate_goes(
        tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, "tls = true")
    rigs.append(rig)
    first = rig.admin_cert("adm1")
    server = await rig.start()
    assert server.scheme == "https"
    status, body = await rig.unassign("adm1")
    assert status == 409 and "admin.tls = true" in body["error"]
    assert rig.store.admin_certificates == ("adm1",) and server.scheme == "https"
    assert await handshake(server.port, None, client_context(rig.ca)) == serial_of(first)
    # With a second one assigned, the first may go.
    second = rig.admin_cert("adm2")
    status, _ = await rig.unassign("adm1")
    assert status == 200 and server.scheme == "https"
    assert await handshake(server.port, None, client_context(rig.ca)) == serial_of(second)
    # Removed behind the API's back: the listener still never falls back to plain HTTP.
    rig.store.unassign("adm2", "admin")
    await server.sync()
    assert server.scheme == "https"


async def test_plain_http_off_loopback_is_refused_at_start_too(tmp_path: Path,
                                                               rigs: list[Rig]) -> None:
    """For an app whose config did not pass the loader's check (nothing is bound)."""
    rig = Rig(tmp_path, "")
    rigs.append(rig)
    with pytest.raises(ConfigError) as ei:
        await rig.start(Address("192.0.2.10", 0))
    assert [p.where for p in ei.value.problems] == ["admin.listen"]
    assert rig.server is None


async def test_without_tls_the_last_unassignment_still_returns_to_http(
        tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, "")
    rigs.append(rig)
    rig.admin_cert("adm1")
    server = await rig.start()
    status, _ = await rig.unassign("adm1")
    assert status == 200 and server.scheme == "http"
