"""The immutable snapshot of everything the data plane reads: config plus run-time injections.

A reload or an injection builds a new `Runtime` and swaps one reference in `RuntimeStore`;
listeners (the data plane, the admin API) are told and rebuild what they derive from it. Objects
injected at run time (the ACME HTTP-01 challenge SubVS and its rule) live beside the config, so a
reload of the file never drops them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .config.model import Config, ContentRule, SubVS, VirtualService, rule_order

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Injection:
    """A SubVS and its content rule added to a VS at run time, with first precedence."""

    vs: str
    subvs: SubVS
    rule: ContentRule


@dataclass(frozen=True, slots=True)
class Runtime:
    generation: int
    config: Config
    injections: tuple[Injection, ...] = ()

    def effective_vs(self, vs: VirtualService) -> VirtualService:
        """The VS as shown to operators: injected SubVSs first, their rules first in precedence.

        The data plane answers injected rules in a first-precedence pre-router of its own, ahead
        of content switching, real servers and redirects, so this view only adds them; it never
        changes how the VS's own traffic is routed (content switching stays as configured).
        """
        mine = [i for i in self.injections if i.vs == vs.name]
        if not mine:
            return vs
        order = tuple(rn for rn, _ in rule_order(vs))
        return dataclasses.replace(
            vs,
            subvs=tuple(i.subvs for i in mine) + vs.subvs,
            precedence=tuple(i.rule.name for i in mine) + order,
        )

    def effective_services(self) -> tuple[VirtualService, ...]:
        return tuple(self.effective_vs(vs) for vs in self.config.virtual_services)

    def rules(self) -> dict[str, ContentRule]:
        """Every content rule by name: the config's, then the injected ones."""
        out = {r.name: r for r in self.config.rules}
        out.update((i.rule.name, i.rule) for i in self.injections)
        return out


Listener = Callable[[Runtime], Awaitable[None]]


class RuntimeStore:
    """Holds the current Runtime; every change makes a new generation and tells the listeners."""

    def __init__(self, config: Config) -> None:
        self._current = Runtime(1, config)
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Runtime:
        return self._current

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def _publish(self, make: Callable[[Runtime], Runtime]) -> Runtime:
        async with self._lock:
            old = self._current
            new = make(old)
            self._current = new
            try:
                for listener in self._listeners:
                    await listener(new)
            except BaseException:
                # Roll every listener back to the last good snapshot, then report the failure.
                self._current = old
                for listener in self._listeners:
                    try:
                        await listener(old)
                    except Exception:
                        logger.exception("rollback to generation %d failed", old.generation)
                raise
            return new

    async def set_config(self, config: Config) -> Runtime:
        return await self._publish(
            lambda rt: Runtime(rt.generation + 1, config, rt.injections))

    async def inject(self, injection: Injection) -> Runtime:
        def make(rt: Runtime) -> Runtime:
            rest = tuple(i for i in rt.injections
                         if not (i.vs == injection.vs and i.subvs.name == injection.subvs.name))
            return Runtime(rt.generation + 1, rt.config, (*rest, injection))
        return await self._publish(make)

    async def remove(self, vs: str, subvs: str) -> Runtime:
        return await self._publish(lambda rt: Runtime(
            rt.generation + 1, rt.config,
            tuple(i for i in rt.injections if not (i.vs == vs and i.subvs.name == subvs))))
