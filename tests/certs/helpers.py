"""Shared test helpers for the certificate store, TLS and admin tests: trustme certificates, an
HTTPS VS value, a tiny keep-alive HTTPS responder using TLSContexts, and a client that reports
the serial it was served."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import ssl
from collections.abc import Container
from pathlib import Path

import trustme
from cryptography import x509

from lbproxy.config.model import Address, Protocol, TLSSettings, VirtualService

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
DEADLINE = 5.0  # seconds any single network step in a test may take on a loaded CI machine


def issue(ca: trustme.CA, *names: str, not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a fresh leaf for `names`."""
    leaf = ca.issue_cert(*names, not_before=not_before, not_after=not_after)
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes()


def serial_of(chain_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(chain_pem).serial_number


def https_vs(name: str, port: int, certificates: tuple[str, ...], default: str = "",
             ciphers: str | None = None) -> VirtualService:
    tls = TLSSettings(certificates=certificates, default_certificate=default)
    if ciphers is not None:
        tls = TLSSettings(certificates, default, ciphers)
    return VirtualService(name=name, listen=Address("127.0.0.1", port),
                          protocol=Protocol.HTTPS, tls=tls)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def start_responder(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int]:
    """An HTTPS server on an ephemeral port answering every request with RESPONSE."""
    server = await asyncio.start_server(_serve, "127.0.0.1", 0, ssl=ctx)
    port: int = server.sockets[0].getsockname()[1]
    return server, port


def peer_serial(writer: asyncio.StreamWriter) -> int:
    obj = writer.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def unverified_context() -> ssl.SSLContext:
    """A client context that accepts any certificate: for looking at what the server offers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def handshake(port: int, server_name: str | None,
                    ctx: ssl.SSLContext | None = None) -> int:
    """Connect (SNI = server_name, none if None), finish the handshake, return the served
    certificate's serial. Without `ctx` any certificate is accepted."""
    _reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx or unverified_context(), server_hostname=server_name or ""),
        DEADLINE)
    try:
        return peer_serial(writer)
    finally:
        writer.close()


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  host: str, path: str = "/") -> bytes:
    """One keep-alive request; returns b"<status line>\\n<body>"."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    length = 0
    for line in head.split(b"\r\n"):
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    body = await asyncio.wait_for(reader.readexactly(length), DEADLINE)
    return head.split(b"\r\n", 1)[0] + b"\n" + body


def tree_digest(root: Path, *, skip: Container[str] = ()) -> str:
    """A hash of every path, mode and content under `root`: equal means byte-for-byte equal.
    Files named in `skip` (log files a refusal appends to) are left out."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            if name in skip:
                continue
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()
