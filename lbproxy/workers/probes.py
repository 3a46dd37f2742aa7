"""Health checks run once per host, in the control process: one prober per real server of each pool
(not one per worker), whose states are sent to every worker.

The pools are the ones the workers' data planes build (`service.pool_specs`, keyed (VS, SubVS));
an unchanged pool keeps its balancer and monitor across reloads, a changed one adopts its servers'
states (as a single process does, see balancer.py), and every change of state reaches `on_change`
as a whole snapshot of every pool (small: three fields per server).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..proxy.balancer import Backend, Balancer
from ..proxy.health import HealthMonitor
from ..proxy.service import PoolSpec, pool_label, pool_specs
from ..runtime import Runtime
from .channel import HealthStates

logger = logging.getLogger(__name__)


class _Pool:
    __slots__ = ("balancer", "monitor", "spec")

    def __init__(self, spec: PoolSpec, balancer: Balancer, monitor: HealthMonitor) -> None:
        self.spec = spec
        self.balancer = balancer
        self.monitor = monitor


class Probes:
    """Every pool's health monitor for the current generation."""

    def __init__(self, on_change: Callable[[HealthStates], None]) -> None:
        self._on_change = on_change
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._scheduled = False

    def states(self) -> HealthStates:
        return {key: {str(b.address): (b.healthy, b.checked, b.down_reason)
                      for b in pool.balancer.backends}
                for key, pool in self._pools.items()}

    async def apply(self, runtime: Runtime) -> None:
        new: dict[tuple[str, str], _Pool] = {}
        started: list[_Pool] = []
        for vs in runtime.config.virtual_services:
            for subvs, spec in pool_specs(vs):
                key = (vs.name, subvs)
                old = self._pools.get(key)
                if old is not None and old.spec == spec:
                    new[key] = old
                    continue
                balancer = Balancer(spec.servers, spec.scheduler,
                                    old.balancer if old is not None else None)
                monitor = HealthMonitor(balancer.backends, spec.check, pool_label(vs.name, subvs),
                                        on_change=self._changed)
                new[key] = _Pool(spec, balancer, monitor)
                started.append(new[key])
        replaced = [p for key, p in self._pools.items() if new.get(key) is not p]
        self._pools = new
        for pool in started:
            pool.monitor.start()
        await asyncio.gather(*(p.monitor.stop() for p in replaced), return_exceptions=True)
        self._on_change(self.states())

    def _changed(self, _b: Backend, _up: bool, _reason: str) -> None:
        # Several servers often change in one probe round: one snapshot for all of them.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        self._on_change(self.states())

    async def stop(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.monitor.stop() for p in pools), return_exceptions=True)
