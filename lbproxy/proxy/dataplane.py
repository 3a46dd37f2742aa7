"""The data plane's public face: `DataPlane` opens listeners, applies reloads and shuts down.

The composition root drives it: `await apply(runtime)` for the first config and every reload,
`await shutdown(drain_timeout)` on SIGTERM; the admin API and metrics read `stats()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, cast

from ..config.model import ContentRule, HealthCheck, Protocol, VirtualService, rule_order
from ..routing import Router, compile_router
from ..runtime import Runtime, new_generation, off_loop
from ..servercontrol import ServerTable
from .accesslog import AccessLog
from .alpn import ALPNClientConnection
from .balancer import Balancer
from .client import ClientConnection
from .connpool import ConnPool, PoolKey
from .counters import Counters, TargetCounters
from .errors import ListenError
from .health import HealthMonitor
from .outbox import Outbox
from .service import (
    Listener,
    Pool,
    PoolFactory,
    Service,
    build_service,
    needs_router,
)
from .stats import dataplane_stats
from .tlsserver import TLSServer

logger = logging.getLogger(__name__)

TLSFactory = Callable[[VirtualService], ssl.SSLContext]
# The listeners made here hold the connections of client.py.
ClientListener = Listener[ClientConnection]

# Deadlines are checked by a sweep this many times per shortest timeout (so a timeout fires at most
# 25% late), but never more often than every 10 ms nor less often than once a second.
_SWEEPS_PER_TIMEOUT = 4
_MIN_TICK = 0.01
_MAX_TICK = 1.0
# Accept backlog: bursts of new connections (wrk opening 256 at once) must not be dropped.
_BACKLOG = 4096


async def bind_sockets(loop: asyncio.AbstractEventLoop, host: str, port: int, *,
                       reuse_port: bool = False, listen: bool = True) -> list[socket.socket]:
    """Sockets bound to every address of `host` (as `loop.create_server` would bind them) and,
    with `listen`, listening, so that a failure shows here, before any running listener is
    touched. Port 0 gets one port for every address. `reuse_port`: SO_REUSEPORT, so that every
    worker process accepts on its own socket of the same address and the kernel spreads new
    connections over them (no accept lock); a control process binds the same without
    `listen` to hold the address (lbproxy.workers)."""
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Each family binds its own socket ("localhost": ::1 and 127.0.0.1).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if not port and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            if listen:
                sock.listen(_BACKLOG)
                sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _dup_sockets(originals: list[Any]) -> list[socket.socket]:
    """Duplicates of listening sockets (the same kernel socket); on a failure none is left open."""
    socks: list[socket.socket] = []
    try:
        for s in originals:
            socks.append(socket.socket(fileno=os.dup(s.fileno())))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _listener_key(vs: VirtualService) -> tuple[Any, ...]:
    # Port 0 (ephemeral, tests) cannot identify a listener across reloads: use the VS name too.
    a = vs.listen
    return (a.host, a.port) if a.port else (a.host, 0, vs.name)


class DataPlane:
    """Every listener and upstream pool of the process; one instance per event loop."""

    def __init__(self, *, tls_factory: TLSFactory | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, reuse_port: bool = False,
                 probes: bool = True, request_tag: bytes = b"") -> None:
        """`reuse_port`, `probes` and `request_tag` are for worker processes (lbproxy.workers):
        sockets shared with the other workers by SO_REUSEPORT; no health probes of its own (the
        control process probes and sends states to `set_health`); a header line added to every
        request forwarded with X-Forwarded-* (the worker id, in debug mode)."""
        self._tls_factory = tls_factory
        self._reuse_port = reuse_port
        self._probes = probes
        self._request_tag = request_tag
        # The last health states sent by a control process: (VS, SubVS) -> address -> state.
        self._health: dict[tuple[str, str], dict[str, tuple[bool, bool, str]]] = {}
        # Run-time real-server overrides (lbproxy.servercontrol), laid over every generation.
        self._servers: ServerTable = {}
        self._loop = loop
        self._listeners: dict[tuple[Any, ...], ClientListener] = {}
        self._outbox: Outbox | None = None  # made on the first apply(), on the running loop
        # Per content-switching VS: (what its router was compiled from, the router).
        self._routers: dict[str, tuple[tuple[object, ...], Router]] = {}
        self._draining: set[ClientListener] = set()
        self._drain_tasks: set[asyncio.Task[None]] = set()
        self._pools: dict[tuple[str, str], Pool] = {}
        self._conn_pools: dict[PoolKey, ConnPool] = {}
        self._counters: dict[str, Counters] = {}
        self._target_counters: dict[tuple[str, str], TargetCounters] = {}
        self._lock: asyncio.Lock | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = _MAX_TICK
        self._runtime: Runtime | None = None
        self._stopped = False
        self._access: AccessLog | None = None

    # -- public API ---------------------------------------------------------------------------

    async def apply(self, runtime: Runtime) -> None:
        """Make the running state match `runtime` (first call: open everything).

        New addresses open, removed ones drain (in the background, up to the config's
        drain_timeout) then close, kept ones swap their Service in place. A bind failure raises
        ListenError and leaves the running listeners as they were.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._stopped:
                raise RuntimeError("the data plane was shut down")
            with new_generation():
                await self._apply(runtime)

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let requests in flight finish (idle connections close at once), close
        what is left at the deadline, stop the health checks and close the upstream pools."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._stopped = True
            loop = self._get_loop()
            deadline = loop.time() + drain_timeout
            listeners = [*self._listeners.values(), *self._draining]
            self._listeners = {}
            self._draining.update(listeners)
            await asyncio.gather(*(lst.drain(deadline) for lst in listeners))
            for t in list(self._drain_tasks):
                t.cancel()
            await asyncio.gather(*self._drain_tasks, return_exceptions=True)
            self._draining.clear()
            await self._stop_monitors(list(self._pools.values()))
            self._pools = {}
            for cp in self._conn_pools.values():
                cp.retired = True
                cp.close_idle()
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            if self._access is not None:
                self._access.flush()

    def listening_ports(self) -> dict[str, tuple[str, int]]:
        """VS name -> the address its socket accepts on (VSs whose socket does not: absent)."""
        return {lst.name: lst.sockname for lst in self._listeners.values() if lst.listening}

    def stats(self) -> dict[str, Any]:
        """Counters for the admin API and metrics, added up now (stats.py says what they are)."""
        return dataplane_stats(self._listeners.values(), self._target_counters,
                               self._conn_pools.values(), len(self._draining))

    # -- apply --------------------------------------------------------------------------------

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _routers_for(self, runtime: Runtime
                           ) -> tuple[dict[str, ContentRule], dict[str, Router]]:
        """(every content rule by name, each content-switching VS's compiled rules), made in a
        worker thread (`off_loop`): 10,000 rules are 0.5-1 s of `re` work, and even telling
        whether they changed takes milliseconds. A VS whose config and rules are unchanged (a
        reload elsewhere, a challenge injected) keeps the previous generation's router."""
        previous = self._routers

        def build() -> tuple[dict[str, ContentRule],
                             dict[str, tuple[tuple[object, ...], Router]]]:
            rules = runtime.rules()
            made: dict[str, tuple[tuple[object, ...], Router]] = {}
            for vs in runtime.config.virtual_services:
                if not needs_router(vs):
                    continue
                key = (vs, *(rules.get(name) for name, _ in rule_order(vs)))
                hit = previous.get(vs.name)
                made[vs.name] = (key, hit[1] if hit is not None and hit[0] == key
                                 else compile_router(vs, rules))
            return rules, made

        rules, made = await off_loop(build)
        self._routers = made
        return rules, {name: router for name, (_, router) in made.items()}

    def _make_monitor(self, balancer: Balancer, check: HealthCheck,
                      label: str) -> HealthMonitor | None:
        return HealthMonitor(balancer.backends, check, label) if self._probes else None

    def set_health(self, states: Mapping[tuple[str, str],
                                         Mapping[str, tuple[bool, bool, str]]]) -> None:
        """Health states probed elsewhere (a worker's control process): per pool (VS, SubVS
        name, "" for the VS's own servers), per real server address: (healthy, checked, down
        reason). Kept, and applied again to the pools every later generation builds."""
        self._health = {k: dict(v) for k, v in states.items()}
        self._apply_health()

    def _apply_health(self) -> None:
        for key, by_addr in self._health.items():
            pool = self._pools.get(key)
            if pool is None:
                continue
            for b in pool.balancer.backends:
                st = by_addr.get(str(b.address))
                if st is not None:
                    b.healthy, b.checked, b.down_reason = st

    def set_servers(self, table: ServerTable) -> None:
        """Run-time real-server overrides (enable, disable, drain, weight; see
        lbproxy.servercontrol): applied now, and to the pools of every later generation."""
        self._servers = table
        if not self._stopped:
            self._apply_servers(self._pools)

    def _apply_servers(self, pools: Mapping[tuple[str, str], Pool]) -> None:
        """Each backend of `pools` gets its override or its config's state and weight; an
        address that no pool has enabled any more keeps no idle upstream connection (a drained
        server's connections close as their requests finish)."""
        enabled: set[tuple[str, int]] = set()
        held: set[tuple[str, int]] = set()
        for key, pool in pools.items():
            pool.balancer.administer(pool.spec.servers, self._servers.get(key, {}))
            for b in pool.balancer.backends:
                (enabled if b.enabled else held).add((b.address.host, b.address.port))
        for pkey, cp in self._conn_pools.items():
            addr = (pkey.host, pkey.port)  # a server's PROXY-protocol pool too
            hold = addr in held and addr not in enabled
            if hold and not cp.retired:
                cp.close_idle()
            cp.retired = hold

    async def _apply(self, runtime: Runtime) -> None:
        loop = self._get_loop()
        cfg = runtime.config
        if self._access is None or self._access.format != cfg.access_log.format:
            # A new log per format (connections cache line prefixes made by their Service's log);
            # the old one still flushes what draining connections write to it.
            self._access = AccessLog(loop, fmt=cfg.access_log.format)
        # Checked once per generation: a logger configured later takes effect on the next reload.
        log = self._access if cfg.access_log.enabled and self._access.enabled() else None
        rules, routers = await self._routers_for(runtime)
        if self._outbox is None:
            self._outbox = Outbox(loop)
        factory = PoolFactory(loop, self._pools, self._conn_pools, self._target_counters,
                              self._make_monitor, self._outbox)
        plan: dict[tuple[Any, ...], tuple[ClientListener | None, Any]] = {}
        # The config's VSs, not `Runtime.effective_services()`: injections are served by a
        # first-precedence router of their own (see service.build_service), for every kind of VS.
        for vs in cfg.virtual_services:
            key = _listener_key(vs)
            counters = self._counters.get(vs.name) or Counters()
            old = self._listeners.get(key)
            # A listener that stopped accepting (whatever closed it) is replaced, not kept.
            keep = old is not None and old.protocol is vs.protocol and old.listening
            port = old.sockname[1] if keep and old is not None else vs.listen.port
            svc = build_service(vs, rules, runtime.injections, factory, counters, log, port,
                                routers.get(vs.name))
            if self._request_tag:
                svc.xfp_line += self._request_tag
            plan[key] = (old if keep else None, svc)
        # Before any listener serves the new pools: a drained server stays drained.
        self._apply_servers(factory.pools)

        # Prepare every new listener (TLS context, sockets bound and listening, servers not yet
        # accepting) before touching a running one: a failure closes what was prepared and leaves
        # the running listeners exactly as they were, with their sockets and connections.
        opened: list[ClientListener] = []
        try:
            for key, (kept, svc) in plan.items():
                if kept is not None:
                    continue
                lst: ClientListener = Listener(loop, key, svc, svc.counters, self._outbox)
                opened.append(lst)
                await self._prepare(lst, svc.vs, self._listeners.get(key))
                svc.port = lst.sockname[1]
        except BaseException:
            for lst in opened:
                lst.stop_accepting()
            raise

        # Commit.
        new_listeners: dict[tuple[Any, ...], ClientListener] = {}
        for lst in opened:
            new_listeners[lst.key] = lst
        replaced_services: list[Service] = []
        for key, (kept, svc) in plan.items():
            self._counters[svc.name] = svc.counters
            if kept is not None:
                replaced_services.append(kept.service)
                kept.set_service(svc, svc.counters)
                new_listeners[key] = kept
        removed = [lst for key, lst in self._listeners.items()
                   if new_listeners.get(key) is not lst]
        self._listeners = new_listeners
        for lst in removed:
            # At once, not in the drain task: a successor on the same socket (a protocol change)
            # must be the only one accepting from it.
            lst.stop_accepting()
            self._start_drain(lst, loop.time() + cfg.drain_timeout)
        for lst in opened:
            await self._start(lst)
        for pool in factory.new_pools:
            if pool.monitor is not None:
                pool.monitor.start()
        replaced = [p for key, p in self._pools.items() if factory.pools.get(key) is not p]
        self._pools = factory.pools
        self._apply_health()
        for addr, cp in list(self._conn_pools.items()):
            idle = factory.addresses.get(addr)
            if idle is None:
                cp.retired = True
                cp.close_idle()
                del self._conn_pools[addr]
            else:
                cp.idle_timeout = idle
        # The replaced generation (its routers, then its config) is let go of in later loop
        # iterations, one part each: freeing 10,000 compiled rules takes milliseconds.
        release_later(loop, [replaced_services, self._runtime])
        self._runtime = runtime
        self._set_tick(runtime)
        await self._stop_monitors(replaced)

    async def _prepare(self, lst: ClientListener, vs: VirtualService,
                       replaced: ClientListener | None) -> None:
        """Give `lst` its TLS context and its servers, not yet accepting. The sockets of
        `replaced` (the same address under another protocol) are shared, not rebound: the address
        is never free, and a failure later in the reload leaves `replaced` untouched."""
        loop = self._get_loop()
        ctx: ssl.SSLContext | None = None
        if vs.protocol is Protocol.HTTPS:
            if self._tls_factory is None:
                raise ListenError(vs.name, str(vs.listen), "HTTPS needs a TLS factory")
            ctx = self._tls_factory(vs)
        try:
            if replaced is not None and replaced.listening:
                socks = _dup_sockets([s for srv in replaced.servers for s in srv.sockets])
            else:
                socks = await bind_sockets(loop, vs.listen.host, vs.listen.port,
                                           reuse_port=self._reuse_port)
        except OSError as e:
            raise ListenError(vs.name, str(vs.listen), e.strerror or str(e)) from e
        try:
            for sock in socks:
                if ctx is None:
                    lst.servers.append(await loop.create_server(
                        lambda: cast(asyncio.Protocol, ClientConnection(lst)), sock=sock,
                        backlog=_BACKLOG, start_serving=False))
                    continue
                # TLS on the socket itself (tlssock.py), after the PROXY header where the VS
                # reads one, which the server looks up per connection (tlsserver.py): a reload may
                # turn that, or `http2`, on or off under a running listener (an HTTPS connection
                # chooses its protocol after ALPN, alpn.py; tls.py changes what ALPN offers).
                lst.servers.append(cast(asyncio.Server, TLSServer(
                    loop, sock, lst, ctx,
                    lambda addrs: cast(asyncio.Protocol, ALPNClientConnection(lst, addrs)))))
        except OSError as e:
            raise ListenError(vs.name, str(vs.listen), e.strerror or str(e)) from e
        finally:
            if len(lst.servers) < len(socks):
                for sock in socks[len(lst.servers):]:
                    sock.close()
        name = socks[0].getsockname()
        lst.sockname = (str(name[0]), int(name[1]))

    async def _start(self, lst: ClientListener) -> None:
        """Let a prepared listener accept (the commit of a reload: its sockets already listen)."""
        vs = lst.service.vs
        for srv in lst.servers:
            try:
                await srv.start_serving()
            except OSError as e:  # not expected: listen() succeeded in _prepare
                logger.error("VS %s: cannot accept on %s: %s", vs.name, vs.listen, e)
        logger.info("VS %s listening on %s (%s)", vs.name, vs.listen, vs.protocol.value)

    def _start_drain(self, lst: ClientListener, deadline: float) -> None:
        self._draining.add(lst)

        async def drain() -> None:
            try:
                await lst.drain(deadline)
            finally:
                self._draining.discard(lst)
                logger.info("VS %s: listener %s:%d closed", lst.name, *lst.sockname)

        task = self._get_loop().create_task(drain(), name=f"drain {lst.name}")
        self._drain_tasks.add(task)
        task.add_done_callback(self._drain_tasks.discard)

    async def _stop_monitors(self, pools: list[Pool]) -> None:
        monitors = [p.monitor for p in pools if p.monitor is not None]
        if monitors:
            await asyncio.gather(*(m.stop() for m in monitors), return_exceptions=True)

    # -- deadlines ----------------------------------------------------------------------------

    def _set_tick(self, runtime: Runtime) -> None:
        shortest = _MAX_TICK * _SWEEPS_PER_TIMEOUT
        for vs in runtime.config.virtual_services:
            t = vs.timeouts
            shortest = min(shortest, t.head, t.idle, t.body, t.first_byte, t.request,
                           t.upstream_idle, t.websocket_idle)
        self._tick = max(_MIN_TICK, min(_MAX_TICK, shortest / _SWEEPS_PER_TIMEOUT))
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = self._get_loop()
        self._sweeper = loop.call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        loop = self._get_loop()
        now = loop.time()
        try:
            for lst in (*self._listeners.values(), *self._draining):
                lst.sweep(now)
            for cp in self._conn_pools.values():
                cp.sweep(now)
        except Exception:  # a bug here must not stop every deadline of the process
            logger.exception("deadline sweep failed")
        finally:
            if not self._stopped or self._draining:
                self._sweeper = loop.call_later(self._tick, self._sweep)


def release_later(loop: asyncio.AbstractEventLoop, parts: list[object]) -> None:
    """Drop the references in `parts`, the last one first, one per loop iteration: whatever only
    they kept alive is freed then, in a turn of its own (not in the turn that swapped it out)."""
    def step() -> None:
        parts.pop()
        if parts:
            loop.call_soon(step)

    if parts:
        loop.call_soon(step)
