"""An admin API on 127.0.0.1 (ephemeral port) over a real store, runtime and TLS contexts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from lbproxy.admin import AdminServer, create_app, load_or_create_token, start_admin
from lbproxy.admin.api import RouteRegistrar
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.model import Address
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
name = "shop"
listen = "127.0.0.1:18443"
protocol = "https"
tls = { certificates = ["base"] }

  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  real_servers = [ { address = "127.0.0.1:19001" } ]

  [[vs.subvs]]
  name = "web"
  rules = ["default"]
  real_servers = [ { address = "127.0.0.1:19002" }, { address = "127.0.0.1:19003" } ]

[[vs]]
name = "plain"
listen = "127.0.0.1:18080"
real_servers = [ { address = "127.0.0.1:19001" } ]
"""

# The shape of DataPlane.stats(), cut down to what the views read.
STATS: dict[str, Any] = {"shop": {"subvs": {"web": {"real_servers": [
    {"address": "127.0.0.1:19002", "healthy": True},
    {"address": "127.0.0.1:19003", "healthy": False}]}}}}


@dataclass
class Admin:
    ca: trustme.CA
    state: Path
    runtime: RuntimeStore
    store: CertStore
    tls: TLSContexts
    token: str
    url: str
    token_file: Path
    session: aiohttp.ClientSession

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.request(
                method, self.url + path, json=body,
                headers=self.auth if headers is None else headers) as resp:
            return resp.status, await resp.json()

    async def raw(self, method: str, path: str, data: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Send `data` as it is: (status, content type, body text)."""
        async with self.session.request(method, self.url + path, data=data,
                                        headers={**self.auth, **(headers or {})}) as resp:
            return resp.status, resp.content_type, await resp.text()


@asynccontextmanager
async def running_admin(tmp_path: Path, extra_routes: Sequence[RouteRegistrar] = (),
                        config: str = CONFIG) -> AsyncIterator[Admin]:
    """The admin API on 127.0.0.1 (ephemeral port), with `extra_routes` registered."""
    ca = trustme.CA()
    state = tmp_path / "state"
    runtime = RuntimeStore(parse_config(config, base=tmp_path))
    store = CertStore(state, usage=config_usage(lambda: runtime.current.config))
    store.import_pem("base", *issue(ca, "shop.example.com"))
    tls = TLSContexts(store, runtime.current.effective_services())
    runtime.subscribe(tls.on_runtime)
    token = load_or_create_token(state)
    app = create_app(runtime=runtime, dataplane_stats=lambda: STATS, store=store, tls=tls,
                     token=token, extra_routes=extra_routes)
    server: AdminServer = await start_admin(app, Address("127.0.0.1", 0))
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield Admin(ca, state, runtime, store, tls, token,
                        f"http://127.0.0.1:{server.port}", state / "admin.token", session)
    finally:
        await server.close()


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    async with running_admin(tmp_path) as a:
        yield a
