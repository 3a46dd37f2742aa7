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

from ..config.model import HealthCheck
from ..proxy.balancer import Backend, Balancer
from ..proxy.health import HealthMonitor
from ..proxy.service import Pool, next_pool, pool_specs
from ..runtime import Runtime
from .channel import HealthStates

logger = logging.getLogger(__name__)


class Probes:
    """Every pool's health monitor for the current generation."""

    def __init__(self, on_change: Callable[[HealthStates], None]) -> None:
        self._on_change = on_change
        self._pools: dict[tuple[str, str], Pool] = {}
        self._scheduled = False

    def states(self) -> HealthStates:
        return {key: {str(b.address): (b.healthy, b.checked, b.down_reason)
                      for b in pool.balancer.backends}
                for key, pool in self._pools.items()}

    async def apply(self, runtime: Runtime) -> None:
        new: dict[tuple[str, str], Pool] = {}
        for vs in runtime.config.virtual_services:
            for subvs, spec in pool_specs(vs):
                key = (vs.name, subvs)
                new[key] = next_pool(key, spec, self._pools.get(key), self._monitor)
        started = [p for key, p in new.items() if self._pools.get(key) is not p]
        replaced = [p for key, p in self._pools.items() if new.get(key) is not p]
        self._pools = new
        for pool in started:
            if pool.monitor is not None:
                pool.monitor.start()
        await _stop(replaced)
        self._on_change(self.states())

    def _monitor(self, balancer: Balancer, check: HealthCheck, label: str) -> HealthMonitor:
        return HealthMonitor(balancer.backends, check, label, on_change=self._changed)

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
        await _stop(pools)


async def _stop(pools: list[Pool]) -> None:
    await asyncio.gather(*(p.monitor.stop() for p in pools if p.monitor is not None),
                         return_exceptions=True)
