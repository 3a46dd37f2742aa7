"""What one VS runs with for one config generation, and the listener that serves it.

`build_service()` turns a configured `VirtualService` into a `Service`: the compiled router,
one `Target` per pool (the VS's own real servers or a SubVS) with its balancer, upstream connection
pools and prebuilt "not available" answer, and the VS's timeouts and limits as plain attributes
(the hot path reads them per request). A `Listener` holds the current `Service` of its address; a
reload swaps that one reference, so requests in flight finish with the generation they started in.

How a VS picks where a request goes:
- kind = redirect: every request gets `redirect_status` with the `redirect_to` Location.
- real servers: balanced over them; none available -> the VS's NotAvailable answer.
- SubVSs with content_switching: the router's choice; the SubVS balances over its real servers, or
  answers its own NotAvailable when it has none available; no rule matched -> the VS's
  NotAvailable; a fail-on-match rule -> 403 and close.
- SubVSs without content_switching: the first SubVS (config order) that has an available real
  server takes the request; none -> the VS's NotAvailable.
- Run-time injections (ACME HTTP-01 SubVS + rule) are tried before all of the above, on every kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast

from ..config.model import (
    ContentRule,
    HealthCheck,
    NotAvailable,
    Protocol,
    ProxyProtocol,
    RealServer,
    Scheduler,
    VirtualService,
    VSKind,
)
from ..routing import Router, compile_router
from ..runtime import Injection
from .accesslog import AccessLog
from .balancer import Backend, Balancer
from .compress import Policy
from .connpool import ConnPool, PoolKey
from .contract import ClientForListener
from .counters import Counters, ServerStats, TargetCounters
from .headerrules import HeaderEdit, compile_headers, local_fields
from .http import LocalResponse
from .outbox import Outbox
from .proxyproto import ProxyConnPool, Sources
from .ratelimit import PoolGate, attach_gates

if TYPE_CHECKING:
    from .health import HealthMonitor

logger = logging.getLogger(__name__)

M_DIRECT: Final = 0  # a VS with real servers
M_SWITCH: Final = 1  # content switching over SubVSs
M_ORDERED: Final = 2  # SubVSs without content switching: the first with an available real server
M_REDIRECT: Final = 3  # an HTTP redirect VS
# Service.fast: how a request is dispatched as soon as its head is parsed, without _start().
# FAST_NONE: through _start() (injected SubVSs, rules on the body, ordered SubVSs, redirect).
FAST_NONE: Final = 0
FAST_DIRECT: Final = 1  # straight to the VS's own real servers
FAST_ROUTE: Final = 2  # to the content rules at once (none of them reads the body)

# Routing decisions remembered per VS (by request target, when the rules look at nothing else):
# enough for the hot URLs of a site; a flood of distinct URLs only empties it now and then.
ROUTE_MEMO_SIZE: Final = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class PoolSpec:
    """What a pool is built from; an unchanged spec keeps its balancer and health monitor."""

    servers: tuple[RealServer, ...]
    scheduler: Scheduler
    check: HealthCheck


class Pool:
    """The balancer of one (VS, SubVS) pool and its health monitor, kept while its spec holds."""

    __slots__ = ("balancer", "key", "label", "monitor", "spec")

    def __init__(self, key: tuple[str, str], label: str, spec: PoolSpec, balancer: Balancer,
                 monitor: HealthMonitor | None) -> None:
        self.key = key
        self.label = label
        self.spec = spec
        self.balancer = balancer
        self.monitor = monitor


class Target:
    """One place a request can be sent: a pool of real servers or only a "not available" answer."""

    __slots__ = ("balancer", "counters", "gate", "headers", "na", "name", "needs_url", "pool",
                 "pools")

    def __init__(self, name: str, pool: Pool | None, pools: dict[Backend, ServerStats],
                 na: NotAvailable, counters: TargetCounters) -> None:
        self.name = name
        self.pool = pool
        self.balancer = pool.balancer if pool is not None else None
        self.pools = pools
        self.na = LocalResponse(na.status, na.body, na.content_type)
        self.counters = counters
        self.needs_url = pool is not None and pool.spec.scheduler is Scheduler.URL_HASH
        self.gate: PoolGate | None = None  # rate limits, compression (ratelimit.py)
        self.headers: HeaderEdit | None = None  # header rules (headerrules.py)


# An idle HTTP/1.1 keep-alive connection holds its request parser this long (t_idle if shorter),
# then gives it back (clientstate.py, D_IDLE_HELD): about 0.9 KiB of the ~2.9 KiB an idle
# connection costs. The next byte makes one anew (0.3 us, once per idle spell, never between
# back-to-back requests); nginx frees its buffer at once, the delay keeps that off the hot path.
PARSER_HOLD: Final = 1.0


class Service:
    """One VS for one generation; read per request by the client connections."""

    __slots__ = (
        "add_forwarded", "counters", "direct", "fast", "local_extra", "log", "max_body",
        "max_connections", "max_fwd", "max_header_bytes", "max_headers", "memo", "mode", "na",
        "name", "port", "pp_sources", "pp_tls_sources", "pre_router",
        "pre_targets", "redirect_status", "redirect_to", "router", "rule_hits", "t_body",
        "t_connect", "t_first_byte", "t_head", "t_hold", "t_idle", "t_request", "t_tunnel",
        "targets", "vs", "xfp_line")

    def __init__(self, vs: VirtualService, counters: Counters, log: AccessLog | None,
                 port: int) -> None:
        self.vs = vs
        self.name = vs.name
        self.counters = counters
        self.log = log
        self.port = port
        self.mode = M_DIRECT
        self.fast = FAST_NONE  # set by build_service
        self.router: Any = None
        self.rule_hits: list[int] = []
        # The router's decisions remembered by request target (see Router.memo_by): the deciding
        # rule's index. Emptied when it reaches ROUTE_MEMO_SIZE entries.
        self.memo: dict[object, int] = {}
        self.targets: tuple[Target, ...] = ()
        self.direct: Target | None = None
        self.pre_router: Router | None = None
        self.pre_targets: tuple[Target, ...] = ()
        # HSTS of an HTTPS VS, on its own answers too (headerrules.local_fields).
        self.local_extra = local_fields(vs, None)
        self.na = LocalResponse(vs.not_available.status, vs.not_available.body,
                                vs.not_available.content_type, self.local_extra)
        self.add_forwarded = vs.add_forwarded_headers
        # Where a PROXY protocol header is accepted from (proxyproto.py); None: it is not. An
        # HTTP VS's connection reads it (HeaderReader); an HTTPS VS's listener reads it off the
        # socket before the TLS handshake (tlsserver.py).
        sources = Sources(vs.proxy_protocol_from) if vs.proxy_protocol_from else None
        https = vs.protocol is Protocol.HTTPS
        self.pp_sources = None if https else sources
        self.pp_tls_sources = sources if https else None
        self.xfp_line = f"X-Forwarded-Proto: {vs.protocol.value}\r\n".encode()
        t = vs.timeouts
        self.t_head = t.head
        self.t_idle = t.idle
        self.t_hold = min(PARSER_HOLD, t.idle)  # an idle connection's parser held (clientstate)
        self.t_body = t.body
        self.t_connect = t.connect
        self.t_first_byte = t.first_byte
        self.t_request = t.request
        self.t_tunnel = t.websocket_idle
        lim = vs.limits
        self.max_header_bytes = lim.max_header_bytes
        self.max_headers = lim.max_headers
        self.max_fwd = lim.max_headers * 4 + 4  # Request.fwd's length at the limit
        self.max_body = lim.max_body
        self.max_connections = lim.max_connections
        self.redirect_status = vs.redirect_status
        self.redirect_to = vs.redirect_to


class PoolFactory:
    """Builds Targets, reusing the Pool of an unchanged spec and the ConnPool of each address."""

    def __init__(self, loop: asyncio.AbstractEventLoop, old_pools: dict[tuple[str, str], Pool],
                 conn_pools: dict[PoolKey, ConnPool],
                 target_counters: dict[tuple[str, str], TargetCounters],
                 make_monitor: MakeMonitor,
                 outbox: Outbox) -> None:
        self.loop = loop
        self.outbox = outbox
        self.old_pools = old_pools
        self.conn_pools = conn_pools
        self.target_counters = target_counters
        self.make_monitor = make_monitor
        self.pools: dict[tuple[str, str], Pool] = {}
        self.new_pools: list[Pool] = []
        self.addresses: dict[PoolKey, float] = {}

    def target(self, vs: VirtualService, subvs_name: str, servers: tuple[RealServer, ...],
               scheduler: Scheduler, check: HealthCheck, na: NotAvailable) -> Target:
        key = (vs.name, subvs_name)
        counters = self.target_counters.get(key)
        if counters is None:
            counters = self.target_counters[key] = TargetCounters()
        name = subvs_name or "-"
        subvs = vs.subvs_by_name(subvs_name) if subvs_name else None
        extra = local_fields(vs, subvs)
        if not servers:
            target = Target(name, None, {}, na, counters)
            if extra:
                target.na = LocalResponse(na.status, na.body, na.content_type, extra)
            return target
        spec = PoolSpec(servers, scheduler, check)
        pool = self.pools.get(key)
        if pool is None:
            old = self.old_pools.get(key)
            pool = self.pools[key] = next_pool(key, spec, old, self.make_monitor)
            if pool is not old:
                self.new_pools.append(pool)
        conns: dict[Backend, ServerStats] = {}
        idle = vs.timeouts.upstream_idle
        send_pp = {s.address: s.send_proxy_protocol for s in servers
                   if s.send_proxy_protocol is not ProxyProtocol.OFF}
        for b in pool.balancer.backends:
            pp = send_pp.get(b.address)
            # Connections that begin with a PROXY header: a pool of their own, kept and swept
            # as the others.
            version = 0 if pp is None else 1 if pp is ProxyProtocol.V1 else 2
            addr = PoolKey(b.address.host, b.address.port, version)
            cp = self.conn_pools.get(addr)
            if cp is None:
                if version:
                    cp = ProxyConnPool(self.loop, addr.host, addr.port, idle, self.outbox)
                    cp.send_proxy = version
                else:
                    cp = ConnPool(self.loop, addr.host, addr.port, idle, self.outbox)
                self.conn_pools[addr] = cp
            st = counters.servers.get(cp.address)
            if st is None:
                st = counters.servers[cp.address] = ServerStats(cp)
            st.cp = cp
            conns[b] = st
            self.addresses[addr] = min(idle, self.addresses.get(addr, idle))
        target = Target(name, pool, conns, na, counters)
        target.headers = compile_headers(vs, subvs)
        if extra:
            target.na = LocalResponse(na.status, na.body, na.content_type, extra)
        return target


MakeMonitor = Callable[[Balancer, HealthCheck, str], "HealthMonitor | None"]


def next_pool(key: tuple[str, str], spec: PoolSpec, old: Pool | None,
              make_monitor: MakeMonitor) -> Pool:
    """The pool of (VS, SubVS) `key` for a new generation: `old` itself while its spec holds,
    else a new one whose balancer adopts the states of `old`'s servers (see balancer.py), with
    its monitor made (not started)."""
    if old is not None and old.spec == spec:
        return old
    label = pool_label(*key)
    balancer = Balancer(spec.servers, spec.scheduler, old.balancer if old is not None else None)
    pool = Pool(key, label, spec, balancer, None)
    pool.monitor = make_monitor(balancer, spec.check, label)
    return pool


def pool_label(vs_name: str, subvs_name: str) -> str:
    """How log lines name a pool of real servers."""
    return f"SubVS {subvs_name} of VS {vs_name}" if subvs_name else f"VS {vs_name}"


def pool_specs(vs: VirtualService) -> list[tuple[str, PoolSpec]]:
    """The pools of real servers `build_service` makes for `vs`, by SubVS name ("" for the VS's
    own real servers): what a control process probes for its workers (injected SubVSs have
    none)."""
    if vs.kind is VSKind.REDIRECT:
        return []
    if vs.real_servers:
        return [("", PoolSpec(vs.real_servers, vs.scheduler, vs.health_check))]
    return [(s.name, PoolSpec(s.real_servers, s.scheduler, s.health_check))
            for s in vs.subvs if s.real_servers]


def needs_router(vs: VirtualService) -> bool:
    """Whether build_service compiles content rules for `vs` (its SubVSs are content-switched)."""
    return (vs.kind is not VSKind.REDIRECT and not vs.real_servers and bool(vs.subvs)
            and vs.content_switching)


def build_service(vs: VirtualService, rules: dict[str, ContentRule],
                  injections: tuple[Injection, ...], factory: PoolFactory, counters: Counters,
                  log: AccessLog | None, port: int, router: Router | None = None) -> Service:
    """The Service of `vs` for one generation; `router`, if given, is `vs`'s rules already
    compiled (DataPlane compiles them off the event loop and reuses unchanged ones)."""
    svc = Service(vs, counters, log, port)
    if vs.kind is VSKind.REDIRECT:
        svc.mode = M_REDIRECT
    elif vs.real_servers:
        svc.mode = M_DIRECT
        svc.direct = factory.target(vs, "", vs.real_servers, vs.scheduler, vs.health_check,
                                    vs.not_available)
    elif vs.subvs:
        targets = {s.name: factory.target(vs, s.name, s.real_servers, s.scheduler,
                                          s.health_check, s.not_available) for s in vs.subvs}
        if vs.content_switching:
            svc.mode = M_SWITCH
            if router is None:
                router = compile_router(vs, rules)
            svc.router = router
            svc.rule_hits = counters.new_rule_gen(router.rule_names)
            svc.targets = tuple(targets[n] for n in router.subvs_names)
        else:
            svc.mode = M_ORDERED
            svc.targets = tuple(targets[s.name] for s in vs.subvs)
    else:
        # No real servers and no SubVSs: every request gets the VS's "not available" answer.
        svc.mode = M_DIRECT
        svc.direct = factory.target(vs, "", (), vs.scheduler, vs.health_check,
                                    vs.not_available)
    if vs.rate_limit is not None or vs.compression is not None or counters.rate_tables or any(
            s.rate_limit is not None for s in vs.subvs):
        attach_gates((*svc.targets, *((svc.direct,) if svc.direct is not None else ())),
                     vs.rate_limit, {s.name: s.rate_limit for s in vs.subvs},
                     Policy(vs.compression, counters.compressed) if vs.compression else None,
                     counters.rate_tables, counters.limits)
    # Injected SubVSs (ACME HTTP-01 challenges) are answered ahead of everything else, whatever the
    # kind of VS: a redirect VS (where challenges usually arrive), a VS with real servers, a VS
    # balancing over its SubVSs in order (which keeps doing so for every other request).
    extra = tuple(i for i in injections if i.vs == vs.name)
    if extra:
        pre_vs = dataclasses.replace(
            vs, kind=VSKind.PROXY, real_servers=(), subvs=tuple(i.subvs for i in extra),
            precedence=tuple(i.rule.name for i in extra), content_switching=True)
        pre_rules = {i.rule.name: i.rule for i in extra}
        router = compile_router(pre_vs, pre_rules)
        pre_targets = {i.subvs.name: factory.target(
            vs, i.subvs.name, i.subvs.real_servers, i.subvs.scheduler, i.subvs.health_check,
            i.subvs.not_available) for i in extra}
        svc.pre_router = router
        svc.pre_targets = tuple(pre_targets[n] for n in router.subvs_names)
    elif svc.mode == M_DIRECT:
        svc.fast = FAST_DIRECT
    elif svc.mode == M_SWITCH and not svc.router.needs_body:
        svc.fast = FAST_ROUTE
    return svc


# The connections a Listener holds (client.py's ClientConnection): a parameter, so that the client
# side can use them as its own while this module knows only what contract.py says of them.
Conn = TypeVar("Conn", bound=ClientForListener)


class Listener(Generic[Conn]):
    """One listening address: its server, its live connections and its current Service."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[Any, ...], service: Service,
                 counters: Counters, outbox: Outbox) -> None:
        self.loop = loop
        self.outbox = outbox
        self.key = key
        self.service = service
        self.name = service.name
        self.protocol = service.vs.protocol
        self.counters = counters
        # One server per listening socket (a host name may resolve to several addresses); made
        # by DataPlane, accepting from the commit of the reload that made them.
        self.servers: list[asyncio.Server] = []
        self.sockname: tuple[str, int] = ("", 0)
        self.conns: set[Conn] = set()
        # Connections that wait on their client, oldest first: those closed to make room for a
        # new one at max_connections (client.py, _make_room). Refilled when empty.
        self.victims: list[Conn] = []
        self.closing = False
        self.drained = asyncio.Event()

    def set_service(self, service: Service, counters: Counters) -> None:
        self.service = service
        self.name = service.name
        self.counters = counters

    def sweep(self, now: float) -> None:
        """Fire the deadlines that have passed (called a few times per shortest timeout)."""
        late = [c for c in self.conns if c.deadline <= now]
        for c in late:
            if c.deadline <= now and not c.closed:
                c.on_timeout(now)

    @property
    def listening(self) -> bool:
        """Whether this listener really accepts: every server serves and the kernel has each
        socket in the listening state (not what the config asked for)."""
        if not self.servers:
            return False
        for srv in self.servers:
            # uvloop's Server.sockets is a list where typeshed says tuple: read untyped, since
            # compiled code checks a declared type.
            socks: Any = cast(Any, srv).sockets
            if not (srv.is_serving() and socks and all(_accepting(s) for s in socks)):
                return False
        return True

    def stop_accepting(self) -> None:
        self.closing = True
        for srv in self.servers:
            srv.close()
        for c in list(self.conns):
            c.shutdown()
        if not self.conns:
            self.drained.set()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, let requests in flight finish until `deadline`, then abort the rest."""
        self.stop_accepting()
        try:
            async with asyncio.timeout_at(deadline):
                await self.drained.wait()
        except TimeoutError:
            left = list(self.conns)
            if left:
                logger.warning("VS %s: %d connections still open at the drain deadline; closing",
                               self.name, len(left))
            for c in left:
                c.transport.abort()


def _accepting(sock: Any) -> bool:
    """The kernel's word on a server socket: in the listening state (SO_ACCEPTCONN)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # closed underneath
        return False
