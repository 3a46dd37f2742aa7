"""TLS from a test's side: the bootstrap certificate an HTTPS VS serves before any is issued,
and a handshake that reports what a server shows a client (its leaf and the ALPN protocol it
chose), verifying nothing: what is served is the question."""

from __future__ import annotations

import asyncio
import ssl

import trustme
from cryptography import x509

HANDSHAKE_TIMEOUT = 10.0  # seconds one handshake may take on a loaded 2-core machine


def bootstrap_certificate() -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a throw-away "boot.invalid" certificate, for Node(bootstrap=)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("boot.invalid")
    return (b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes())


def unverified_context(alpn: list[str] | None) -> ssl.SSLContext:
    """A client context that checks nothing, offering `alpn` (None: no ALPN extension)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def handshake(port: int, name: str, alpn: list[str] | None, *, host: str = "127.0.0.1"
                    ) -> tuple[x509.Certificate, str | None]:
    """The leaf `host:port` shows a client of `name` offering `alpn` (None: no ALPN
    extension), and the protocol it chose."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        _, writer = await asyncio.open_connection(host, port, ssl=unverified_context(alpn),
                                                  server_hostname=name)
    try:
        obj = writer.get_extra_info("ssl_object")
        return (x509.load_der_x509_certificate(obj.getpeercert(binary_form=True)),
                obj.selected_alpn_protocol())
    finally:
        writer.close()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await writer.wait_closed()
        except (ssl.SSLError, ConnectionError, TimeoutError):
            pass
