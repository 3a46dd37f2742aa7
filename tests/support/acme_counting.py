"""A real ACME client factory (lbproxy.letsencrypt.default_client_factory) that counts the calls
its clients make to one method: how a test proves that no order reached the CA."""

from __future__ import annotations

from typing import Any

from lbproxy.letsencrypt import default_client_factory
from lbproxy.letsencrypt.issuer import AcmeClientLike


class CountingFactory:
    """The real client factory; `calls` counts its clients' calls to `method`
    ("obtain_certificate": orders placed through the issuer; "new_order": newOrder requests
    sent to the CA)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.calls = 0

    def __call__(self, url: str, key: Any, account_url: str | None,
                 ca_bundle: str | None) -> AcmeClientLike:
        client = default_client_factory(url, key, account_url, ca_bundle)
        real = getattr(client, self.method)
        outer = self

        async def counted(*args: Any, **kwargs: Any) -> Any:
            outer.calls += 1
            return await real(*args, **kwargs)

        setattr(client, self.method, counted)
        return client
