"""tls-alpn-01 through lbproxy against a real Pebble: the certificate is proved on the HTTPS VS
(Pebble's tlsPort) with nothing listening on Pebble's HTTP port; while a validation runs, a client
offering "acme-tls/1" alone gets the validation certificate and every other client of the name
(h2/http/1.1 ALPN, or none) the normal one; the same with two worker processes; renewals keep
the challenge type; and the refusals before any order (a wildcard without dns-01, dns-01 with no
provider, tls-alpn-01 on an HTTP VS)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from acmeclient.challenges import ACME_IDENTIFIER_OID, ACME_TLS_ALPN
from lbproxy.runtime import Runtime
from tests.e2e.le_node import STEP, Node, cli, https_get, trust
from tests.support.acme_counting import AuthzRecorder, CountingFactory
from tests.support.lbconfig import config_head, https_vs
from tests.support.pebble import (
    PebbleInstance,
    free_port,
    tls_alpn_pebble,
)
from tests.support.tlsclient import bootstrap_certificate, handshake, unverified_context

NAME = "alpn.le.test"


pebble = pytest.fixture(scope="module")(tls_alpn_pebble)   # the HTTPS VS on its tls_port


boot = pytest.fixture(scope="module")(bootstrap_certificate)


def config(pebble: PebbleInstance, http_port: int) -> str:
    return (config_head(pebble=pebble)
            + https_vs("secure", f"127.0.0.1:{pebble.tls_port}", ["alpn", "boot"],
                       more="http2 = true\n") + f"""
[[vs]]
name = "plain"
listen = "127.0.0.1:{http_port}"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
"""
)


def closed(port: int) -> bool:
    """Nothing accepts on 127.0.0.1:port (so Pebble's http-01 validator could reach nothing)."""
    with socket.socket() as s:
        s.settimeout(STEP)
        return s.connect_ex(("127.0.0.1", port)) != 0


def is_validation_cert(cert: x509.Certificate, name: str) -> bool:
    try:
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.critical and san.get_values_for_type(x509.DNSName) == [name]


class Watch:
    """A RuntimeStore listener (after the TLS contexts and the data plane, or every worker):
    at each generation with a validation, what each kind of client is served."""

    def __init__(self, node: Node, port: int) -> None:
        self.node = node
        self.port = port
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, rt: Runtime) -> None:
        if not rt.validations:
            return
        v = rt.validations[-1]
        acme, acme_proto = await handshake(self.port, v.host, [ACME_TLS_ALPN])
        h2, h2_proto = await handshake(self.port, v.host, ["h2", "http/1.1"])
        h1, h1_proto = await handshake(self.port, v.host, ["http/1.1"])
        none, none_proto = await handshake(self.port, v.host, None)
        other, _ = await handshake(self.port, "other.le.test", [ACME_TLS_ALPN])
        digest = x509.load_pem_x509_certificate(v.cert_pem).extensions.get_extension_for_oid(
            ACME_IDENTIFIER_OID).value
        self.seen.append({
            "host": v.host, "vs": v.vs,
            "acme": (is_validation_cert(acme, v.host), acme_proto,
                     acme.fingerprint(hashes_sha256()) == x509.load_pem_x509_certificate(
                         v.cert_pem).fingerprint(hashes_sha256())),
            "normal": [(is_validation_cert(c, v.host), p) for c, p in
                       ((h2, h2_proto), (h1, h1_proto), (none, none_proto))],
            "normal_serials": {h2.serial_number, h1.serial_number, none.serial_number},
            "other_name": is_validation_cert(other, "other.le.test"),
            "digest_len": len(getattr(digest, "value", b"")),
        })


def hashes_sha256() -> Any:
    from cryptography.hazmat.primitives import hashes
    return hashes.SHA256()


def served_serial(node: Node, cert_id: str) -> int:
    return node.store.require(cert_id).serial


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_tls_alpn01_certificate_with_port_80_closed(
        pebble: PebbleInstance, tmp_path: Path, boot: tuple[bytes, bytes], workers: int) -> None:
    http_port = free_port()   # the plain VS: not Pebble's HTTP port, which stays closed
    authz = AuthzRecorder()
    node = Node(tmp_path / "node", config(pebble, http_port), bootstrap=boot, workers=workers,
                client_factory=authz)
    await node.start()
    try:
        assert closed(pebble.http_port), "something listens on Pebble's HTTP port"
        watch = Watch(node, pebble.tls_port)
        node.runtime.subscribe(watch)
        code, out = await cli(node, "le", "register", "--email", "ops@le.test")
        assert code == 0, out
        boot_serial = served_serial(node, "boot")

        code, out = await cli(node, "le", "request", "--id", "alpn", "--cn", NAME,
                              "--vs", "secure", "--challenge", "tls-alpn-01")
        assert code == 0, out
        assert "Challenge:     tls-alpn-01" in out
        assert node.runtime.current.validations == ()   # taken away after the order
        assert node.runtime.current.injections == ()    # no http-01 SubVS either
        # during the validation: acme-tls/1 alone -> the validation certificate, with that
        # protocol; h2/http/1.1/no ALPN -> the normal certificate (the bootstrap one here)
        assert len(watch.seen) == 1, watch.seen
        seen = watch.seen[0]
        assert (seen["host"], seen["vs"]) == (NAME, "secure")
        assert seen["acme"] == (True, ACME_TLS_ALPN, True)
        assert seen["normal"] == [(False, "h2"), (False, "http/1.1"), (False, None)]
        assert seen["normal_serials"] == {boot_serial}
        assert seen["other_name"] is False   # a name not under validation: never
        assert seen["digest_len"] == 34      # DER OCTET STRING of a SHA-256

        # after: the issued certificate for every client, the acme-tls/1 one included
        issued = served_serial(node, "alpn")
        _, _, serial = await https_get("127.0.0.1", pebble.tls_port, NAME, trust(pebble))
        assert serial == issued
        for alpn in ([ACME_TLS_ALPN], ["h2", "http/1.1"], None):
            cert, _ = await handshake(pebble.tls_port, NAME, alpn)
            assert cert.serial_number == issued and not is_validation_cert(cert, NAME)

        st, view = await node.api("GET", "/api/le/certs/alpn")
        assert st == 200 and view["challenge"] == "tls-alpn-01"
        assert view["http_challenge_vs"] == [f"{NAME}: secure"]
        code, out = await cli(node, "le", "list")
        assert code == 0 and "tls-alpn-01" in out

        # a renewal proves the name the same way: the template kept the challenge type
        assert await authz.forget() == 1   # or Pebble may reuse the valid authorization
        code, out = await cli(node, "le", "renew", "alpn")
        assert code == 0, out
        assert len(watch.seen) == 2
        renewal = watch.seen[1]
        assert renewal["acme"][0] and renewal["normal_serials"] == {issued}
        assert served_serial(node, "alpn") != issued
        assert node.runtime.current.validations == ()
        assert closed(pebble.http_port)
    finally:
        await node.stop()


async def test_refused_before_any_order(pebble: PebbleInstance, tmp_path: Path,
                                        boot: tuple[bytes, bytes]) -> None:
    factory = CountingFactory("obtain_certificate")
    node = Node(tmp_path / "node", config(pebble, free_port()), bootstrap=boot,
                client_factory=factory)
    await node.start()
    try:
        code, out = await cli(node, "le", "register")
        assert code == 0, out
        placed = node.manager.orders_placed
        cases = [
            # a wildcard name: dns-01 only (code 11, before ordering), whatever else is asked
            (["--cn", "*.le.test", "--vs", "plain"], "(code: 11)", "wildcard name *.le.test"),
            (["--cn", "*.le.test", "--vs", "secure", "--challenge", "tls-alpn-01"],
             "(code: 11)", "can only be proved by dns-01, not tls-alpn-01"),
            (["--cn", "www.le.test", "--vs", "plain", "--san", "*.le.test=plain"],
             "(code: 11)", "wildcard name *.le.test"),
            # dns-01 with no DNS provider plugged in
            (["--cn", "*.le.test", "--vs", "plain", "--challenge", "dns-01"], "(code: 104)",
             "dns-01 needs a DNS provider"),
            # tls-alpn-01 through a plain HTTP VS: 17, sub-code 4
            (["--cn", "www.le.test", "--vs", "plain", "--challenge", "tls-alpn-01"],
             "sub-code 4 (code: 17)", "cannot answer tls-alpn-01"),
        ]
        for i, (args, code_text, why) in enumerate(cases):
            code, out = await cli(node, "le", "request", "--id", f"w{i}", *args)
            assert code != 0, (args, out)
            assert code_text in out and why in out, (args, out)
            assert f"w{i}" not in node.manager.entries
        # a name that is not a name, wildcard or not
        code, out = await cli(node, "le", "request", "--id", "bad", "--cn", "*.*.le.test",
                              "--vs", "plain", "--challenge", "dns-01")
        assert code != 0 and "not a fully qualified domain name" in out
        assert factory.calls == 0 and node.manager.orders_placed == placed
        log = node.manager.log.codes()
        assert (11, None) in log and (104, None) in log and (17, 4) in log
        # the API refuses an unknown type by its field
        st, ans = await node.api("POST", "/api/le/certs", {
            "id": "x", "common_name": "www.le.test", "vs": "plain", "challenge": "dns-02"})
        assert st == 400 and "challenge" in str(ans)
        assert factory.calls == 0
    finally:
        await node.stop()


def test_the_client_hello_reader_never_raises() -> None:
    """Every truncation and byte flip of real ClientHellos reads as a tuple, never an error."""
    from lbproxy.proxy.clienthello import client_hello_alpn

    hellos: list[bytes] = []

    def grab(conn: Any, direction: str, version: Any, ctype: int, mtype: int,
             data: bytes) -> None:
        if direction == "write" and ctype == 22 and mtype == 1:
            hellos.append(bytes(data))

    for alpn in (["acme-tls/1"], ["h2", "http/1.1"], None):
        ctx = unverified_context(alpn)
        ctx._msg_callback = grab  # type: ignore[attr-defined]
        obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x.le.test")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
    assert len(hellos) == 3
    assert client_hello_alpn(hellos[0]) == ("acme-tls/1",)
    assert client_hello_alpn(hellos[1]) == ("h2", "http/1.1")
    assert client_hello_alpn(hellos[2]) == ()
    for hello in hellos:
        for cut in range(len(hello)):
            assert isinstance(client_hello_alpn(hello[:cut]), tuple)
        for i in range(len(hello)):
            flipped = bytearray(hello)
            flipped[i] ^= 0xFF
            assert isinstance(client_hello_alpn(bytes(flipped)), tuple)


async def test_the_hello_is_read_only_while_a_validation_runs(tmp_path: Path,
                                                              boot: tuple[bytes, bytes]) -> None:
    """No CA: a validation put into the runtime by hand. The listener reads ClientHellos only
    while it is there; the acme-tls/1 client alone gets it; it goes with the validation."""
    from acmeclient.challenges import tls_alpn01_certificate
    from lbproxy.runtime import AlpnValidation

    port = free_port()
    text = config_head() + https_vs("secure", f"127.0.0.1:{port}", ["boot"])
    node = Node(tmp_path / "node", text, bootstrap=boot)
    await node.start()
    try:
        listener = node.tls._listeners["secure"]
        assert getattr(listener, "_msg_callback", None) is None   # nothing to read: no cost
        cert_pem, key_pem = tls_alpn01_certificate(NAME, "tok.thumb")
        await node.runtime.add_validation(AlpnValidation("secure", NAME, "tok", cert_pem,
                                                         key_pem))
        assert node.tls.validating("secure") == (NAME,)
        assert getattr(listener, "_msg_callback", None) is not None
        cert, proto = await handshake(port, NAME, [ACME_TLS_ALPN])
        assert is_validation_cert(cert, NAME) and proto == ACME_TLS_ALPN
        # acme-tls/1 among others is a normal client (RFC 8737: the validator offers it alone)
        cert, proto = await handshake(port, NAME, ["h2", ACME_TLS_ALPN, "http/1.1"])
        assert not is_validation_cert(cert, NAME) and proto in ("h2", "http/1.1")
        for alpn in (["h2", "http/1.1"], None):
            cert, _ = await handshake(port, NAME, alpn)
            assert not is_validation_cert(cert, NAME)
        await node.runtime.remove_validation("secure", NAME, "tok")
        assert node.tls.validating("secure") == ()
        assert getattr(listener, "_msg_callback", None) is None
        cert, proto = await handshake(port, NAME, [ACME_TLS_ALPN])
        assert not is_validation_cert(cert, NAME) and proto is None
    finally:
        await node.stop()


async def test_an_acme_tls_connection_is_closed_after_the_handshake(
        tmp_path: Path, boot: tuple[bytes, bytes]) -> None:
    from acmeclient.challenges import tls_alpn01_certificate
    from lbproxy.runtime import AlpnValidation

    port = free_port()
    text = config_head() + https_vs("secure", f"127.0.0.1:{port}", ["boot"])
    node = Node(tmp_path / "node", text, bootstrap=boot)
    await node.start()
    try:
        cert_pem, key_pem = tls_alpn01_certificate(NAME, "tok.thumb")
        await node.runtime.add_validation(AlpnValidation("secure", NAME, "tok", cert_pem,
                                                         key_pem))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=unverified_context([ACME_TLS_ALPN]), server_hostname=NAME)
        try:
            # a client that goes on as if it were HTTP is not served: the server closes
            writer.write(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            async with asyncio.timeout(2.0):   # well under the 10 s head timeout
                data = await reader.read()
            assert b"HTTP/1.1" not in data
        finally:
            writer.close()
    finally:
        await node.stop()
