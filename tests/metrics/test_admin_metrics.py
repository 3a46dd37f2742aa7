"""/metrics and `lbproxy status` against a real data plane on 127.0.0.1: requests sent through the
proxy show up in the scrape and the status; /metrics needs the admin token unless opened; the
status lists VSs with listeners, SubVSs, real servers (up/down, connections, requests/s) and
every certificate with days left, next renewal and last error."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.admin import api as admin_api
from lbproxy.admin import create_app, load_or_create_token, start_admin, views
from lbproxy.admin.cli import main as cli_main
from lbproxy.admin.server import AdminServer
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.model import Address
from lbproxy.events import CertStatus
from lbproxy.metrics import MetricsCollector, metrics_routes
from lbproxy.proxy import DataPlane
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import RuntimeStore
from tests.certs.helpers import issue

CONFIG = """
state_dir = "state"
[[rule]]
name = "api"
match = "prefix"
pattern = "/api/"

[[vs]]
name = "web"
listen = "127.0.0.1:{vs_port}"
health_check = {{ type = "none" }}
  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  real_servers = [ {{ address = "127.0.0.1:{up}" }} ]
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  real_servers = [ {{ address = "127.0.0.1:{up}" }}, {{ address = "127.0.0.1:{up2}" }} ]
"""
REQUESTS = 5


@dataclass
class Env:
    url: str
    proxy: str
    token: str
    state: Path
    session: aiohttp.ClientSession
    dataplane: DataPlane
    config: Path


async def _free_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async def hello(_r: web.Request) -> web.Response:
        return web.Response(text="hi")
    backend = web.Application()
    backend.router.add_get("/{tail:.*}", hello)
    up_runner, up = await _start(backend)
    up2_runner, up2 = await _start(backend)
    text = CONFIG.format(up=up, up2=up2, vs_port=await _free_port())
    (tmp_path / "lbproxy.toml").write_text(text)
    cfg = parse_config(text, base=tmp_path)
    runtime = RuntimeStore(cfg)
    dataplane = DataPlane()
    await dataplane.apply(runtime.current)
    state = tmp_path / "state"
    store = CertStore(state, usage=config_usage(lambda: runtime.current.config))
    ca = trustme.CA()
    store.import_pem("imported", *issue(ca, "old.example.com", not_after=dt.datetime.now(
        dt.UTC) + dt.timedelta(days=5)))
    tls = TLSContexts(store, runtime.current.effective_services())
    now = dt.datetime.now(dt.UTC)
    le = CertStatus(id="shop", names=("shop.example.com",), managed_by="letsencrypt",
                    not_before=now - dt.timedelta(days=80), not_after=now + dt.timedelta(days=10),
                    state="backoff", auto_renew=True, next_attempt=now + dt.timedelta(hours=2),
                    failures=2, last_error="validation failed for shop.example.com",
                    last_code=13)

    def register_certs(app: web.Application) -> None:  # what lbproxy.admin.le_api.le_routes does
        app[admin_api.CERT_STATUS_KEY] = lambda: [le]

    collector = MetricsCollector(dataplane.stats, certs=lambda: [le],
                                 acme=lambda: {("order", "13"): 2})
    token = load_or_create_token(state)
    app = create_app(runtime=runtime, dataplane_stats=dataplane.stats, store=store, tls=tls,
                     token=token, extra_routes=[register_certs, metrics_routes(collector)],
                     open_paths=("/metrics",) if getattr(request, "param", False) else ())
    server: AdminServer = await start_admin(app, Address("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{dataplane.listening_ports()['web'][1]}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for i in range(REQUESTS):
            async with session.get(proxy + ("/api/x" if i < 2 else "/page")) as resp:
                assert resp.status == 200
        yield Env(f"http://127.0.0.1:{server.port}", proxy, token, state, session, dataplane,
                  tmp_path / "lbproxy.toml")
    await server.close()
    await dataplane.shutdown(0.1)
    await up_runner.cleanup()
    await up2_runner.cleanup()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.parametrize("env", [False, True], ids=["token", "open"], indirect=True)
async def test_metrics_endpoint(env: Env, request: pytest.FixtureRequest) -> None:
    is_open = request.node.callspec.params["env"]
    async with env.session.get(env.url + "/metrics") as resp:
        assert resp.status == (200 if is_open else 401)
    # The rest of the admin API keeps its token either way.
    async with env.session.get(env.url + "/api/status") as resp:
        assert resp.status == 401
    async with env.session.get(env.url + "/metrics",
                               headers={"Authorization": f"Bearer {env.token}"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        m = _samples(await resp.text())
    assert m[("lbproxy_vs_requests_total", (("vs", "web"),))] == REQUESTS
    assert m[("lbproxy_subvs_requests_total", (("subvs", "api"), ("vs", "web")))] == 2
    assert m[("lbproxy_subvs_requests_total", (("subvs", "rest"), ("vs", "web")))] == 3
    served = sum(v for (name, labels), v in m.items()
                 if name == "lbproxy_real_server_requests_total")
    assert served == REQUESTS
    assert m[("lbproxy_certificate_renewal_failures", (("certificate", "shop"),))] == 2
    assert m[("lbproxy_acme_requests_total", (("operation", "order"), ("result", "13")))] == 2


async def test_status_api_and_cli(env: Env) -> None:
    async with env.session.get(env.url + "/api/status",
                               headers={"Authorization": f"Bearer {env.token}"}) as resp:
        body = await resp.json()
    (web_vs,) = body["services"]
    assert web_vs["name"] == "web" and web_vs["listening"] and web_vs["requests"] == REQUESTS
    assert web_vs["listen"] == env.proxy.removeprefix("http://")
    assert [s["name"] for s in web_vs["subvs"]] == ["api", "rest"]
    rest = web_vs["subvs"][1]
    assert rest["requests"] == 3 and rest["available"] is True
    assert [r["up"] for r in rest["real_servers"]] == [True, True]
    assert sum(r["requests"] for r in rest["real_servers"]) == 3
    certs = {c["id"]: c for c in body["certificate_status"]}
    assert certs["shop"]["last_error"].startswith("validation failed")
    assert 9.9 < certs["shop"]["days_left"] <= 10 and certs["shop"]["next_renewal"]

    out = io.StringIO()
    flags = ["--admin", env.url, "--token-file", str(env.state / "admin.token")]
    code = await asyncio.to_thread(cli_main, ["status", *flags], out=out)
    text = out.getvalue()
    assert code == 0, text
    lines = text.splitlines()
    assert any(ln.startswith("web ") and "listening" in ln and f" {REQUESTS} " in ln
               for ln in lines), text
    assert any(ln.startswith("  rest ") and "available" in ln for ln in lines), text
    assert any(ln.strip().startswith("127.0.0.1:") and " up " in ln for ln in lines), text
    (shop,) = [ln for ln in lines if ln.startswith("shop ")]
    assert "backoff" in shop and "validation failed" in shop and ("10.0" in shop or "9.9" in shop)

    out = io.StringIO()
    code = await asyncio.to_thread(cli_main, ["status", "--json", *flags], out=out)
    data = json.loads(out.getvalue())
    assert code == 0 and data["services"][0]["subvs"][0]["requests"] == 2


async def test_requests_per_second_from_successive_samples(env: Env) -> None:
    meter = admin_api.RateMeter(window=60)
    stats = env.dataplane.stats()
    from lbproxy.metrics import request_counters
    meter.observe(0.0, request_counters(stats))
    for _ in range(4):
        async with env.session.get(env.proxy + "/page") as resp:
            assert resp.status == 200
    rates = meter.rates(2.0, request_counters(env.dataplane.stats()))
    assert rates["web"] == 2.0 and rates["web/rest"] == 2.0
    rows = views.services_status(
        parse_config(env.config.read_text(), base=env.config.parent).virtual_services,
        env.dataplane.stats(), rates)
    assert rows[0]["requests_per_s"] == 2.0


async def test_status_says_not_listening_when_the_socket_is_gone(env: Env) -> None:
    """`listening` in the status comes from the socket, not from the VS having stats."""
    vss = parse_config(env.config.read_text(), base=env.config.parent).virtual_services
    rows = views.services_status(vss, env.dataplane.stats(), {})
    assert rows[0]["listening"] is True
    stats = env.dataplane.stats()
    stats["virtual_services"]["web"]["listening"] = False  # as the data plane reports a dead one
    rows = views.services_status(vss, stats, {})
    assert rows[0]["listening"] is False and rows[0]["connections"] is not None
