"""One lbproxy instance in-process for end-to-end tests: runtime, certificate store, TLS
contexts, data plane, Let's Encrypt manager and admin API, wired as the composition root does."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509

from lbproxy.admin import AdminServer, create_app, le_cli, load_or_create_token, start_admin
from lbproxy.admin.le_api import le_routes
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.model import Address, Config
from lbproxy.letsencrypt import ClientFactory, LEManager, default_client_factory
from lbproxy.proxy import DataPlane
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import Runtime, RuntimeStore
from lbproxy.workers import Supervisor
from tests.support.lbconfig import app_vs, config_head, rest_vs
from tests.support.pebble import PebbleInstance, free_port

STEP = 10.0  # seconds any single network step may take on a loaded 2-core CI machine


async def start_upstream(text: str) -> tuple[web.AppRunner, int]:
    """A real server answering `text` to everything."""
    async def handler(_r: web.Request) -> web.Response:
        return web.Response(text=text)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, port


@dataclass
class Node:
    """An lbproxy instance; `start()` creates `root` if missing, and `start()` / `stop()` may be
    repeated on the same state dir."""

    root: Path
    config_text: str
    client_factory: ClientFactory = default_client_factory
    runtime: RuntimeStore = field(init=False)
    store: CertStore = field(init=False)
    tls: TLSContexts = field(init=False)
    dataplane: DataPlane | Supervisor = field(init=False)
    manager: LEManager = field(init=False)
    admin: AdminServer = field(init=False)
    token: str = field(init=False)
    bootstrap: tuple[bytes, bytes] | None = None  # (chain, key) imported as "boot"
    seen: list[Runtime] = field(default_factory=list)
    on_inject: list[Callable[[Runtime], Any]] = field(default_factory=list)
    workers: int = 1  # > 1: worker processes serve, this process is their control process

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Config:
        return self.runtime.current.config

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "lbproxy.toml"
        cfg_path.write_text(self.config_text)
        config = parse_config(self.config_text, base=self.root)
        self.runtime = RuntimeStore(config)
        self.store = CertStore(self.state, usage=config_usage(lambda: self.runtime.current.config))
        if self.bootstrap is not None and self.store.get("boot") is None:
            self.store.import_pem("boot", *self.bootstrap)
        self.tls = TLSContexts(self.store, self.runtime.current.effective_services())
        refresh = None
        if self.workers > 1:
            sup = Supervisor(self.workers, lookup=self.store, base_dir=self.root)
            self.store.watch(sup.certs_changed)
            self.dataplane, refresh = sup, sup.refresh
        else:
            self.dataplane = DataPlane(tls_factory=self.tls.factory)
        self.runtime.subscribe(self.tls.on_runtime)
        self.runtime.subscribe(self.dataplane.apply)
        self.runtime.subscribe(self._record)
        self.manager = LEManager(self.state, self.runtime, self.store, hostname="lbtest",
                                 client_factory=self.client_factory, config_path=cfg_path,
                                 cluster=config.cluster)   # a [cluster] table: a cluster node
        await self.dataplane.apply(self.runtime.current)
        await self.manager.start()
        self.token = load_or_create_token(self.state)
        app = create_app(runtime=self.runtime, dataplane_stats=self.dataplane.stats,
                         store=self.store, tls=self.tls, token=self.token,
                         extra_routes=[le_routes(self.manager)], refresh_stats=refresh)
        self.admin = await start_admin(app, Address("127.0.0.1", 0))

    async def _record(self, rt: Runtime) -> None:
        self.seen.append(rt)
        if rt.injections:
            for cb in self.on_inject:
                r = cb(rt)
                if asyncio.iscoroutine(r):
                    await r

    async def stop(self) -> None:
        await self.admin.close()
        await self.manager.stop()
        await self.dataplane.shutdown(1.0)

    def cli_args(self) -> list[str]:
        return ["--admin", self.admin_url, "--token-file", str(self.state / "admin.token")]

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async with s.request(method, self.admin_url + path, json=body,
                                 headers={"Authorization": f"Bearer {self.token}"}) as r:
                return r.status, await r.json()


async def start_node(root: Path, config_text: str, **kwargs: Any) -> Node:
    """A started Node on `root`; `kwargs` are Node's other fields."""
    node = Node(root, config_text, **kwargs)
    await node.start()
    return node


def web_config(*more_vs: str) -> str:
    """A config for a node on a fake CA: the admin API, no access log, a plain HTTP VS "web" on a
    free port with no real server (an order names it; HTTP-01 needs no upstream), then
    `more_vs` ([[vs]] tables, e.g. from `https_vs_table`)."""
    return f"""
state_dir = "state"
[admin]
listen = "127.0.0.1:1"
[access_log]
enabled = false
[[vs]]
name = "web"
listen = "127.0.0.1:{free_port()}"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
""" + "".join(more_vs)


def https_vs_table(name: str, port: int, certificates: tuple[str, ...], default: str) -> str:
    """A [[vs]] table: HTTPS on 127.0.0.1:`port` serving `certificates`, no real server."""
    return f"""[[vs]]
name = "{name}"
listen = "127.0.0.1:{port}"
protocol = "https"
tls = {{ certificates = {json.dumps(list(certificates))}, default_certificate = "{default}" }}
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
"""


def add_a_record(pebble: PebbleInstance, host: str, address: str) -> None:
    """Point `host` at `address` in pebble-challtestsrv's DNS (Pebble's resolver)."""
    req = urllib.request.Request(
        pebble.challtestsrv_url + "/add-a",
        data=json.dumps({"host": host.rstrip(".") + ".", "addresses": [address]}).encode(),
        method="POST")
    urllib.request.urlopen(req, timeout=STEP).close()


def trust(pebble: PebbleInstance) -> ssl.SSLContext:
    """A client context trusting only Pebble's issuing root."""
    ctx = ssl.create_default_context(cadata=pebble.root_pem())
    return ctx


async def https_get(host: str, port: int, name: str, ctx: ssl.SSLContext,
                    path: str = "/") -> tuple[int, bytes, int]:
    """(status, body, serial of the served leaf) over a fresh connection with SNI `name`."""
    async with asyncio.timeout(STEP):
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                       server_hostname=name)
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            serial = x509.load_der_x509_certificate(der).serial_number
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                         .encode())
            data = await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ssl.SSLError, ConnectionError):
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, serial


async def http_get(host: str, port: int, name: str, path: str) -> tuple[int, bytes, bytes]:
    """(status, body, head) of one plain HTTP request."""
    async with asyncio.timeout(STEP):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await reader.read()
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, head


def monotonic_deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def config(pebble: PebbleInstance, upstream: int, https_port: int, admin_port: int = 0) -> str:
    p = pebble.http_port
    return (config_head(admin_port=admin_port or 1, pebble=pebble,
                        letsencrypt="renew_period_days = 30\n")
            + app_vs("web", f"127.0.0.1:{p}", upstream)
            + rest_vs("web2", f"127.0.0.2:{p}")
            + app_vs("secure", f"127.0.0.1:{https_port}", upstream, more=(
                'protocol = "https"\n'
                'tls = { certificates = ["site", "boot"], default_certificate = "boot" }\n'))
            + f"""
[[vs]]
name = "redir"
listen = "127.0.0.3:{p}"
kind = "redirect"
redirect_to = "https://{{hostname}}:{https_port}{{path}}"
"""
            + app_vs("secure3", f"127.0.0.3:{https_port}", upstream, more=(
                'protocol = "https"\n'
                'tls = { certificates = ["rcert", "boot"], default_certificate = "boot" }\n')))


async def cli(node: Node, *argv: str) -> tuple[int, str]:
    """Run `lbproxy ARGV` (le_cli.main) in a thread: it is synchronous urllib."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(le_cli.main, [*argv, *node.cli_args()], out=out, err=err)
    return code, out.getvalue() + err.getvalue()
