"""An HTTPS VS served by the real data plane for a test, without the rest of lbproxy: the
config's first VS on a free 127.0.0.1 port with a certificate for one name from a test CA, through
a RuntimeStore, a CertStore, TLSContexts and a DataPlane wired as the composition root does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme

from lbproxy.certs import CertStore, config_usage
from lbproxy.config.model import Address, Config
from lbproxy.proxy import DataPlane
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import RuntimeStore
from tests.certs.helpers import issue


async def serve_https(tmp_path: Path, cfg: Config, ca: trustme.CA, name: str, *,
                      cert_id: str = "site") -> tuple[RuntimeStore, DataPlane, int]:
    """Serve `cfg` (its first VS moved to 127.0.0.1:0) with `name`'s certificate from `ca`
    imported as `cert_id`; the runtime, the data plane and the VS's port."""
    vs = dataclasses.replace(cfg.virtual_services[0], listen=Address("127.0.0.1", 0))
    runtime = RuntimeStore(dataclasses.replace(
        cfg, virtual_services=(vs, *cfg.virtual_services[1:])))
    store = CertStore(tmp_path / "state", usage=config_usage(lambda: runtime.current.config))
    chain, key = issue(ca, name)
    store.import_pem(cert_id, chain, key)
    tls = TLSContexts(store, runtime.current.effective_services())
    dataplane = DataPlane(tls_factory=tls.factory)
    runtime.subscribe(tls.on_runtime)
    runtime.subscribe(dataplane.apply)
    await dataplane.apply(runtime.current)
    return runtime, dataplane, dataplane.listening_ports()[vs.name][1]
