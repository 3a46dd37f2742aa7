"""Errors the data plane raises on purpose (the rest of the tree is in lbproxy/errors.py).

LBProxyError
 +-- ListenError        a listener could not be opened (names the VS and the address)
"""

from __future__ import annotations

from ..errors import LBProxyError


class ListenError(LBProxyError):
    """A VS's listening socket could not be bound; the running state was left untouched."""

    def __init__(self, vs: str, address: str, reason: str) -> None:
        self.vs = vs
        self.address = address
        super().__init__(f"VS {vs!r}: cannot listen on {address}: {reason}")
