"""`lbproxy le request` and POST /api/le/certs (an LEManager on a fake CA with a fake dns-01
provider behind the real admin API): dns-01 goes without a Virtual Service (`--vs` left out,
`--san NAME`, no `vs` in the body), while http-01 and tls-alpn-01 keep needing one for every
name: the CLI refuses as bad usage (exit 2) before asking the API, the API answers code 16."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbproxy.admin.cli import main
from lbproxy.admin.client import EXIT_OK, EXIT_USAGE
from lbproxy.admin.le_api import le_routes
from lbproxy.config import parse_config
from tests.admin.conftest import CONFIG, Admin, running_admin
from tests.letsencrypt.le_fakes import ManagerEnv

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class NullDns:
    """A dns-01 provider that publishes nothing (the fake CA believes every answer)."""

    challenge_type = "dns-01"

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        pass

    async def cleanup(self, domain: str, token: str) -> None:
        pass


@dataclass
class Rig:
    admin: Admin
    le: ManagerEnv

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = [*argv, "--admin", self.admin.url, "--token-file", str(self.admin.token_file)]
        code = await asyncio.to_thread(main, args, out=out, err=err)
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    le = await ManagerEnv.start(tmp_path / "le", parse_config(CONFIG, base=tmp_path), T0)
    le.manager.solvers.dns01 = lambda cert_id, t: NullDns()
    try:
        async with running_admin(tmp_path, extra_routes=[le_routes(le.manager)]) as admin:
            yield Rig(admin, le)
    finally:
        await le.manager.stop()


async def test_cli_dns01_request_without_vs(rig: Rig) -> None:
    code, out, err = await rig.cli("le", "request", "--id", "wild", "--cn", "*.a.test",
                                   "--san", "a.test", "--challenge", "dns-01")
    assert code == EXIT_OK, err
    assert "Challenge:     dns-01" in out
    assert "*.a.test: (dns-01: none), a.test: (dns-01: none)" in out
    t = rig.le.manager.entries["wild"].template
    assert (t.vs, t.sans, t.challenge) == ("", (("a.test", ""),), "dns-01")
    assert rig.le.store.require("wild").names == ("*.a.test", "a.test")


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_cli_http01_and_tls_alpn01_still_require_vs(rig: Rig, challenge: str) -> None:
    code, out, err = await rig.cli("le", "request", "--id", "c", "--cn", "a.test",
                                   "--challenge", challenge)
    assert code == EXIT_USAGE and out == ""
    assert "the following arguments are required: --vs" in err
    code, out, err = await rig.cli("le", "request", "--id", "c", "--cn", "a.test", "--vs",
                                   "shop", "--san", "b.test", "--challenge", challenge)
    assert code == EXIT_USAGE and "--san takes NAME=VS, got 'b.test'" in err
    assert rig.le.manager.entries == {} and rig.le.ca.orders == []


async def test_cli_default_challenge_still_requires_vs(rig: Rig) -> None:
    code, _, err = await rig.cli("le", "request", "--id", "c", "--cn", "a.test")
    assert code == EXIT_USAGE and "--vs" in err and "dns-01" in err
    assert rig.le.manager.entries == {}


async def test_api_dns01_request_without_vs(rig: Rig) -> None:
    status, body = await rig.admin.call("POST", "/api/le/certs", {
        "id": "w", "common_name": "*.b.test", "sans": [{"name": "b.test"}],
        "challenge": "dns-01"})
    assert status == 201, body
    assert body["status"] == "valid" and body["sans"] == [{"name": "b.test", "vs": ""}]
    assert rig.le.manager.entries["w"].template.vs == ""


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
@pytest.mark.parametrize("names", [{}, {"vs": "shop", "sans": [{"name": "b.test"}]}],
                         ids=["no vs", "SAN without vs"])
async def test_api_http01_and_tls_alpn01_without_vs_are_16(
        rig: Rig, challenge: str, names: dict[str, object]) -> None:
    status, body = await rig.admin.call("POST", "/api/le/certs", {
        "id": "c", "common_name": "a.test", "challenge": challenge, **names})
    assert (status, body["code"]) == (400, 16), body
    assert body["error"] == "certificate c: names and VSs do not match (code: 16)"
    assert rig.le.manager.entries == {} and rig.le.ca.orders == []


@pytest.mark.parametrize("args", [
    ("--id", "c", "--cn", "a.test"),                                  # no --vs for http-01
    ("--id", "c", "--cn", "a.test", "--vs", "shop", "--san", "b.test"),  # a SAN without its VS
    ("--id", "c", "--cn", "a.test", "--vs", "shop", "--ec", "--key-size", "2048"),
])
def test_bad_usage_is_refused_before_any_server_is_asked(tmp_path: Path,
                                                         args: tuple[str, ...]) -> None:
    """Exit 2 (bad usage) with nothing listening at the admin address: not 3 (unreachable), which
    a connection attempt would have given first."""
    out, err = io.StringIO(), io.StringIO()
    code = main(["le", "request", *args, "--admin", "https://127.0.0.1:9",
                 "--token-file", str(tmp_path / "none")], out=out, err=err)
    assert code == EXIT_USAGE, err.getvalue()
    assert "unreach" not in err.getvalue() and "refused" not in err.getvalue()
