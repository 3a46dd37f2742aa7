"""Start and stop a real Knot DNS server (Debian's /usr/sbin/knotd) on a free 127.0.0.1 port for
tests: an authoritative server for one zone that takes TSIG-signed dynamic updates.

`start_knot(workdir)` is a context manager yielding a `KnotInstance`: its own directory (config,
zone file, journal and timer databases, control socket, log), no root privileges used, UDP and
TCP on one free port. The zone (default `example.test.`) holds SOA, NS `ns1`, `ns1 A 127.0.0.1`,
`@ A 127.0.0.1` and a wildcard `* A 127.0.0.1`, so *every* name of the zone resolves to 127.0.0.1:
point Pebble at it (`-dnsserver <instance.dns_address>`) and its validator finds both the dns-01
TXT records lbproxy adds and the A records of http-01/tls-alpn-01 names. Only A: a name has no
AAAA, so Pebble (which asks AAAA first) falls back to 127.0.0.1.

Two TSIG keys: `update_key`, allowed to update the zone (its base64 secret is in
`instance.secret_file`, the shape `tsig_secret_file` reads), and `query_key`, known to the server
but allowed nothing (Knot answers an update signed with it BADKEY, as for an unknown key).
Readiness is an SOA answer within a bounded deadline; on a failed start, and when the block
raises, the server's log is put in the error (or printed, for pytest to show).

`start_knot(workdir2, secondary_of=primary)` runs a secondary of a running primary's zone: it
transfers the zone (AXFR, then IXFR) and polls the primary's SOA every 2 s (Knot's least), so a
record added on the primary shows there up to 2 s later, as on a real secondary: a propagation
wait to wait for.

    from tests.support.knot import knot_or_skip, start_knot
    knot_or_skip()
    with start_knot(tmp_path / "knot") as knot:
        knot.dns_address        # "127.0.0.1:PORT", for Pebble's -dnsserver
        knot.settings()         # Rfc2136Settings for lbproxy's dns-01 responder
        knot.txt("_acme-challenge.example.test")   # the TXT values it answers now
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.pebble import free_port
from tests.support.process import kill, wait_ready

if TYPE_CHECKING:
    import dns.message

    from lbproxy.config.dnsconfig import Rfc2136Settings

READY_TIMEOUT = 10.0  # seconds for knotd to answer SOA; it starts in ~50 ms here
STOP_TIMEOUT = 10.0   # seconds for it to exit on SIGTERM
POLL_INTERVAL = 0.02  # readiness polling step (bounded by READY_TIMEOUT)
QUERY_TIMEOUT = 2.0   # one test query on loopback


def knot_available() -> bool:
    if shutil.which("knotd") is None and not os.path.exists("/usr/sbin/knotd"):
        return False
    try:
        import dns.query  # noqa: F401
    except ImportError:
        return False
    return True


def knot_or_skip() -> None:
    """Skip the calling test, or the whole module when called at its top, without knotd."""
    import pytest

    if not knot_available():
        pytest.skip("knotd or dnspython not installed (apt-get install -y knot)",
                    allow_module_level=True)


def _knotd() -> str:
    return shutil.which("knotd") or "/usr/sbin/knotd"


@dataclass(frozen=True, slots=True)
class TsigKey:
    name: str        # absolute: "lbproxy-update."
    algorithm: str   # "hmac-sha256"
    secret: str      # base64

    @classmethod
    def new(cls, name: str, algorithm: str = "hmac-sha256") -> TsigKey:
        return cls(name, algorithm, base64.b64encode(secrets.token_bytes(32)).decode())


class KnotInstance:
    """One knotd serving `zone` on 127.0.0.1:`port` (UDP and TCP)."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, zone: str = "example.test.",
                 algorithm: str = "hmac-sha256", records: Sequence[str] = (),
                 secondary_of: KnotInstance | None = None,
                 allowed_names: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.port = free_port(udp_too=True)
        self.zone = zone.rstrip(".") + "."
        self.update_key = TsigKey.new("lbproxy-update.", algorithm)
        self.query_key = TsigKey.new("lbproxy-query-only.", algorithm)
        self.secret_file = workdir / "update.key"
        self.secret_file.write_text(self.update_key.secret + "\n")
        self.secret_file.chmod(0o600)
        self.log = workdir / "knot.log"
        self.conf = workdir / "knot.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.primary = secondary_of
        if secondary_of is None:
            zone_lines = [
                f"$ORIGIN {self.zone}",
                "$TTL 60",
                f"@ SOA ns1.{self.zone} hostmaster.{self.zone} 1 3600 600 86400 60",
                f"@ NS ns1.{self.zone}",
                "ns1 A 127.0.0.1",
                "@ A 127.0.0.1",
                "* A 127.0.0.1",
                *records,
            ]
            (workdir / "zone.db").write_text("\n".join(zone_lines) + "\n")
            # Updates with the update key; zone transfers to any loopback secondary.
            zone_conf = "    file: zone.db\n    acl: [update, transfer]\n"
            remotes = ""
        else:
            # Follows the primary by polling its SOA every 2 s (no NOTIFY): the record
            # reaches this server up to 2 s after the primary took it, as a real
            # secondary lags. It takes no update.
            zone_conf = ("    master: primary\n    refresh-min-interval: 2\n"
                         "    refresh-max-interval: 2\n")
            remotes = (f"remote:\n  - id: primary\n    address: "
                       f"{secondary_of.host}@{secondary_of.port}\n")
        # The update key may change anything in the zone, or only TXT records at these owners.
        restrict = ("    update-type: [TXT]\n    update-owner: name\n"
                    "    update-owner-match: equal\n"
                    f"    update-owner-name: [{', '.join(allowed_names)}]\n"
                    if allowed_names else "")
        keys = "".join(f"  - id: {k.name}\n    algorithm: {k.algorithm}\n    secret: {k.secret}\n"
                       for k in (self.update_key, self.query_key))
        self.conf.write_text(
            f'server:\n    rundir: "{workdir}"\n    listen: {self.host}@{self.port}\n'
            f'log:\n  - target: "{self.log}"\n    any: info\n'
            # Small LMDB maps: a test zone needs a few KiB, not the default 500 MiB each.
            f'database:\n    storage: "{workdir}"\n    journal-db-max-size: 20M\n'
            "    kasp-db-max-size: 5M\n    timer-db-max-size: 5M\n    catalog-db-max-size: 5M\n"
            f'control:\n    listen: "{workdir}/knot.sock"\n'
            f"key:\n{keys}"
            f"{remotes}"
            f"acl:\n  - id: update\n    key: {self.update_key.name}\n    action: update\n"
            f"{restrict}"
            f"  - id: transfer\n    address: {self.host}\n    action: transfer\n"
            f'template:\n  - id: default\n    storage: "{workdir}"\n    semantic-checks: on\n'
            "    zonefile-sync: -1\n    journal-content: changes\n"
            f"zone:\n  - domain: {self.zone}\n{zone_conf}")

    @property
    def dns_address(self) -> str:
        """host:port, as Pebble's -dnsserver takes it."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def settings(self, **overrides: Any) -> Rfc2136Settings:
        """lbproxy's dns-01 settings for this server and its update key (zone left to the SOA
        lookup unless given)."""
        from lbproxy.config.dnsconfig import Rfc2136Settings

        values: dict[str, Any] = {
            "server": self.host,
            "port": self.port,
            "tsig_key_name": self.update_key.name,
            "tsig_algorithm": self.update_key.algorithm,
            "tsig_secret_file": str(self.secret_file),
            "timeout": 2.0,
            "propagation_timeout": 10.0,
            "poll_interval": 0.05,
        }
        values.update(overrides)
        return Rfc2136Settings(**values)

    def config_section(self, secret_file: Path | None = None, extra: str = "") -> str:
        """The `[letsencrypt.dns]` section of an lbproxy config for this server, with the values
        of `settings()` (`secret_file`: another file holding the update key's secret; `extra`:
        more lines)."""
        return (f"""[letsencrypt.dns]
server = "{self.host}"
port = {self.port}
tsig_key_name = "{self.update_key.name}"
tsig_secret_file = "{secret_file or self.secret_file}"
timeout = 2
propagation_timeout = 10
poll_interval = 0.05
""" + extra)

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """A plain (unsigned, non-recursive) UDP query to this server."""
        import dns.flags
        import dns.message
        import dns.query

        q = dns.message.make_query(name, rdtype)
        q.flags &= ~dns.flags.RD
        return dns.query.udp(q, self.host, port=self.port, timeout=QUERY_TIMEOUT)

    def txt(self, name: str) -> set[str]:
        """The TXT values this server answers for `name` now (each record's strings joined)."""
        import dns.name
        import dns.rdatatype

        response = self.query(name, "TXT")
        owner = dns.name.from_text(name)
        return {b"".join(rd.strings).decode() for rrset in response.answer
                if rrset.rdtype == dns.rdatatype.TXT and rrset.name == owner for rd in rrset}

    def update_txt(self, name: str, value: str, *, delete: bool = False) -> None:
        """Add (or delete) one TXT value with the update key, as another client would."""
        import dns.query
        import dns.rcode
        import dns.tsig
        import dns.update

        k = self.update_key
        key = dns.tsig.Key(k.name, k.secret, k.algorithm)
        u = dns.update.UpdateMessage(self.zone, keyring=key, keyname=key.name,
                                     keyalgorithm=key.algorithm)
        if delete:
            u.delete(name, "TXT", f'"{value}"')
        else:
            u.add(name, 60, "TXT", f'"{value}"')
        r = dns.query.tcp(u, self.host, port=self.port, timeout=QUERY_TIMEOUT)
        if r.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"knot refused the test's update: {dns.rcode.to_text(r.rcode())}")

    def start(self) -> None:
        if self.running:
            raise RuntimeError("knotd is already running")
        with open(self.workdir / "knotd.out", "ab") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen([_knotd(), "-c", str(self.conf)], cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import dns.exception
        import dns.message
        import dns.query
        import dns.rcode

        def serving() -> bool:   # over TCP: refused at once until knotd listens (UDP would wait)
            q = dns.query.tcp(dns.message.make_query(self.zone, "SOA"), self.host,
                              port=self.port, timeout=QUERY_TIMEOUT)
            return q.rcode() == dns.rcode.NOERROR and bool(q.answer)

        assert self.proc is not None
        wait_ready(self.proc, "knotd", serving, self.log_tail, timeout=READY_TIMEOUT,
                   interval=POLL_INTERVAL, not_ready=f"not serving {self.zone}",
                   not_yet=(dns.exception.DNSException, OSError, EOFError),
                   stop_timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM and wait for knotd to exit (killed after STOP_TIMEOUT, then an error)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill()
                raise RuntimeError(f"knotd did not exit on SIGTERM:\n{self.log_tail()}") from None
        self.proc = None

    def _kill(self) -> None:
        kill(self.proc, STOP_TIMEOUT)
        self.proc = None

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for path in (self.log, self.workdir / "knotd.out"):
            try:
                parts.append(path.read_text(errors="replace")[-chars:])
            except OSError:
                continue
        return "\n".join(p for p in parts if p) or "(no log)"


@contextlib.contextmanager
def start_knot(workdir: Path, *, zone: str = "example.test.", algorithm: str = "hmac-sha256",
               records: Sequence[str] = (), secondary_of: KnotInstance | None = None,
               allowed_names: Sequence[str] = ()) -> Iterator[KnotInstance]:
    """A running knotd until the block exits (then stopped). `records` are extra zone-file
    lines (relative to the zone's origin). `allowed_names` (relative owners, e.g.
    "_acme-challenge") restricts the update key to TXT records at exactly those names, as a
    careful operator's ACL does. With `secondary_of`, a secondary of that (running) primary's
    zone instead, serving it once transferred and polling for changes every 2 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    if secondary_of is not None:
        zone = secondary_of.zone
    instance = KnotInstance(workdir, zone=zone, algorithm=algorithm, records=records,
                            secondary_of=secondary_of, allowed_names=allowed_names)
    instance.start()
    try:
        yield instance
    except BaseException:
        print(f"--- knotd log ({workdir}) ---\n{instance.log_tail()}", file=sys.stderr)
        raise
    finally:
        instance.stop()
