"""Real ACME client factories (lbproxy.letsencrypt.default_client_factory) that watch what their
clients do: count the calls to one method (how a test proves that no order reached the CA), or
remember the orders' authorizations so a test can give them up before a renewal."""

from __future__ import annotations

from typing import Any

from acmeclient.client import AcmeClient, OrderResource
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


class AuthzRecorder:
    """The real client factory; remembers the authorizations of every order its clients place.

    `forget()` deactivates them (RFC 8555 §7.5.2), so the next order proves each name again.
    A test that asserts what a renewal's validation looked like needs it: Pebble reuses a valid
    authorization for a new order unless `rand.Intn(100) > PEBBLE_AUTHZREUSE`, which with the
    lowest value it accepts (0) still reuses one time in a hundred."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self._account: tuple[str, Any, str | None, str | None] | None = None

    def __call__(self, url: str, key: Any, account_url: str | None,
                 ca_bundle: str | None) -> AcmeClientLike:
        client = default_client_factory(url, key, account_url, ca_bundle)
        assert isinstance(client, AcmeClient)
        real = client.new_order
        outer = self

        async def recorded(*args: Any, **kwargs: Any) -> OrderResource:
            order = await real(*args, **kwargs)
            outer._account = (url, key, client.account_url, ca_bundle)
            outer.authorizations.extend(order.order.authorizations)
            return order

        client.new_order = recorded
        return client

    async def forget(self) -> int:
        """Deactivate every valid authorization recorded so far; returns how many."""
        assert self._account is not None, "no order placed through this factory yet"
        url, key, account_url, ca_bundle = self._account
        done = 0
        async with AcmeClient(url, key, account_url=account_url, ca_bundle=ca_bundle) as client:
            for authz in dict.fromkeys(self.authorizations):
                if (await client.get_authorization(authz)).status == "valid":
                    gone = await client.deactivate_authorization(authz)
                    assert gone.status == "deactivated", gone
                    done += 1
        self.authorizations.clear()
        return done
