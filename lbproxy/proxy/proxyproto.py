"""The PROXY protocol (HAProxy's, versions 1 and 2): its header parsed from a client connection
of a VS that accepts it, and built for a real server that wants it.

Accepting (`[[vs]] proxy_protocol_from`): a connection from a listed address or network must
begin with a v1 or v2 header (v2 TLVs are skipped; LOCAL, UNKNOWN and non-IP families keep the
connection's own address); anything else is refused and logged. A connection from anywhere else
is served as usual, but one that begins with a PROXY signature is refused and logged (a client
must not choose its own address). `HeaderReader` is the connection's protocol until then
(transport.set_protocol hands it over), so a VS without the PROXY protocol runs no code of this
module; the header is bounded (v1: 107 bytes; v2: MAX_V2 bytes) and must arrive within the head
timeout (the connection's deadline, as for a request head).

Sending (`send_proxy_protocol`): the header goes first on every new connection to the real
server, naming the client (as accepted above, or the connection's peer) and the address it
connected to (`Exchange.attach`); `ProxyConnPool` reuses such a connection only for requests that
would send the same header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast

from .connpool import ConnPool
from .contract import RequestForUpstream
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .contract import ClientForUpstream

Req = TypeVar("Req", bound=RequestForUpstream)

# (source address, source port, destination address, destination port).
Addresses = tuple[str, int, str, int]

V1_PREFIX: Final = b"PROXY "
V2_SIG: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# A v1 line is at most 107 bytes with its CRLF (the spec's worst case, "PROXY UNKNOWN" + two
# IPv6 addresses and ports).
V1_MAX: Final = 107
# A v2 header: 16 bytes and its addresses and TLVs. HAProxy and the cloud balancers send a few
# hundred bytes of TLVs at most; more is refused rather than buffered.
MAX_V2: Final = 16 + 2048
_V2_ADDR_LEN: Final = {0x11: 12, 0x21: 36}  # TCP over IPv4, TCP over IPv6: addresses and ports


class ProxyHeaderError(ValueError):
    """A malformed or oversized PROXY protocol header (the message says what was wrong)."""


def parse(buf: bytes) -> tuple[int, Addresses | None] | None:
    """The PROXY header at the start of `buf`: (its length, the addresses it gives or None for
    LOCAL/UNKNOWN/non-IP), or None while `buf` is a valid beginning that needs more bytes;
    raises ProxyHeaderError for anything else."""
    if buf[:1] == b"P":
        return _parse_v1(buf)
    if buf[:1] == b"\r":
        return _parse_v2(buf)
    raise ProxyHeaderError("no PROXY protocol signature")


def starts_with_signature(buf: bytes) -> bool | None:
    """Whether `buf` begins with a PROXY signature (v1 or v2): None while too short to tell."""
    for sig in (V1_PREFIX, V2_SIG):
        n = min(len(buf), len(sig))
        if buf[:n] == sig[:n]:
            return True if n == len(sig) else None
    return False


def _parse_v1(buf: bytes) -> tuple[int, Addresses | None] | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] != V1_PREFIX[:n]:
            raise ProxyHeaderError("no PROXY protocol signature")
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyHeaderError("v1 header with a bare CR or LF")
        return None
    line = buf[:end]
    if not line.startswith(V1_PREFIX):
        raise ProxyHeaderError("no PROXY protocol signature")
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header with non-ASCII bytes") from None
    if words[1] == "UNKNOWN":
        return end + 2, None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 header is not 'PROXY TCP4|TCP6 src dst sport dport' or "
                               "'PROXY UNKNOWN'")
    version = 4 if words[1] == "TCP4" else 6
    src = _ip(words[2], version)
    dst = _ip(words[3], version)
    return end + 2, (src, _port(words[4]), dst, _port(words[5]))


def _ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: {text[:45]!r} is not an IP address") from None
    if ip.version != version:
        raise ProxyHeaderError(f"v1 header: {text!r} is not an IPv{version} address")
    return str(ip)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header: {text[:8]!r} is not a port")
    return int(text)


def _parse_v2(buf: bytes) -> tuple[int, Addresses | None] | None:
    n = min(len(buf), 12)
    if buf[:n] != V2_SIG[:n]:
        raise ProxyHeaderError("no PROXY protocol signature")
    if len(buf) < 16:
        return None
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {ver_cmd >> 4}")
    cmd = ver_cmd & 0xF
    if cmd > 1:
        raise ProxyHeaderError(f"v2 header with unknown command {cmd}")
    fam = buf[13]
    (length,) = struct.unpack_from("!H", buf, 14)
    total = 16 + length
    if total > MAX_V2:
        raise ProxyHeaderError(f"v2 header of {total} bytes; the limit is {MAX_V2}")
    if len(buf) < total:
        return None
    if cmd == 0:  # LOCAL: the balancer's own connection (a health check): its own address
        return total, None
    need = _V2_ADDR_LEN.get(fam)
    if need is None:  # UNSPEC, UNIX, UDP: no TCP/IP address to take
        return total, None
    if length < need:
        raise ProxyHeaderError(f"v2 header: {length} bytes of addresses, {need} needed")
    if fam == 0x11:
        src = str(ipaddress.IPv4Address(buf[16:20]))
        dst = str(ipaddress.IPv4Address(buf[20:24]))
        sport, dport = struct.unpack_from("!HH", buf, 24)
    else:
        src = str(ipaddress.IPv6Address(buf[16:32]))
        dst = str(ipaddress.IPv6Address(buf[32:48]))
        sport, dport = struct.unpack_from("!HH", buf, 48)
    return total, (src, sport, dst, dport)  # TLVs (after the addresses) skipped


def build(version: int, addrs: Addresses) -> bytes:
    """The header of PROXY protocol `version` (1 or 2) for a TCP connection from the client
    `addrs` names. A v4 client on a v6 socket (or the reverse) is sent as IPv6 (v4-mapped)."""
    src_ip, sport, dst_ip, dport = addrs
    src = _unmapped(src_ip)
    dst = _unmapped(dst_ip)
    if src.version != dst.version:
        src = _as_v6(src)
        dst = _as_v6(dst)
    if version == 1:
        fam = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        return V2_SIG + bytes((0x21, 0x11)) + struct.pack("!H", len(body)) + body
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIG + bytes((0x21, 0x21)) + struct.pack("!H", len(body)) + body


def _unmapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


class Sources:
    """The addresses and networks a VS accepts the PROXY protocol from (compiled once per
    generation; checked once per connection)."""

    __slots__ = ("nets",)

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.nets = tuple(ipaddress.ip_network(n) for n in networks)

    def __contains__(self, ip: str) -> bool:
        try:
            addr = _unmapped(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.nets)


def connection_addresses(transport: asyncio.BaseTransport) -> Addresses:
    """A connection's own (peer, local) addresses, as a PROXY header would give them."""
    peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
    local = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
    return (str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))


class Client(Protocol):
    """What HeaderReader needs of the client connection it reads for (client.py's)."""

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def eof_received(self) -> bool | None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def proxied(self, addrs: Addresses | None) -> None:
        """The header named the client `addrs` (None: keep the connection's own)."""

    def refuse_proxy(self, why: str) -> None:
        """Log `why`, count it and close the connection."""


class HeaderReader(asyncio.Protocol):
    """A client connection's protocol until its PROXY header is read (`trusted`: its peer is a
    listed source, and must send one) or, for any other peer, until its first bytes show none;
    then the connection's own protocol takes over the transport, with the bytes that followed."""

    __slots__ = ("buf", "client", "peer", "transport", "trusted")

    def __init__(self, client: Client, transport: asyncio.Transport, peer: str,
                 trusted: bool) -> None:
        self.client = client
        self.transport = transport
        self.peer = peer
        self.trusted = trusted
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        client = self.client
        if not self.trusted:
            sig = starts_with_signature(buf)
            if sig is None:
                self.buf = buf
            elif sig:
                self.buf = b""
                client.refuse_proxy(f"a PROXY protocol header from {self.peer}, which is not in "
                                    "proxy_protocol_from")
            else:
                self._hand_over(buf)
            return
        try:
            got = parse(buf)
        except ProxyHeaderError as e:
            self.buf = b""
            client.refuse_proxy(f"bad PROXY protocol header from {self.peer}: {e}")
            return
        if got is None:
            self.buf = buf
            return
        n, addrs = got
        client.proxied(addrs)
        self._hand_over(buf[n:])

    def _hand_over(self, rest: bytes) -> None:
        self.buf = b""
        client = self.client
        self.transport.set_protocol(cast(asyncio.BaseProtocol, client))  # client.py's
        if rest:
            client.data_received(rest)

    def eof_received(self) -> bool | None:
        if self.trusted and self.buf:  # (a balancer's TCP check sends nothing: not logged)
            self.client.refuse_proxy(f"{self.peer} closed before its PROXY protocol header "
                                     "ended")
            return True
        return self.client.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.connection_lost(exc)

    def pause_writing(self) -> None:
        self.client.pause_writing()

    def resume_writing(self) -> None:
        self.client.resume_writing()


class ProxyConnPool(ConnPool):
    """The connections to a real server that wants the PROXY protocol. Each begins with a header
    naming one client, so an idle one serves again only a request whose header would be the
    same (the same client address and port, the same VS address: HAProxy's private connections):
    never through `acquire`, only found by `connect`. Swept and bounded as any pool."""

    __slots__ = ()

    def acquire(self, now: float) -> UpstreamConnection[Any] | None:
        return None

    def connect(self, client: ClientForUpstream[UpstreamConnection[Req], Req], req: Req,
                timeout: float) -> None:
        header = client.proxy_header(self.send_proxy)
        idle = self.idle
        for i in range(len(idle) - 1, -1, -1):  # the most recent first
            up = idle[i]
            if up.pp_key == header:
                del idle[i]
                t = up.transport
                if (up.idle_since < self.loop.time() - self.idle_timeout or t is None
                        or t.is_closing()):
                    up.close()
                    break
                up.reused = True
                client.attach(req, up)
                return
        super().connect(client, req, timeout)
