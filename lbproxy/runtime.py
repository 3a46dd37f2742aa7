"""The immutable snapshot of everything the data plane reads: config plus run-time injections, and
how the next one is built without stalling the event loop.

A reload or an injection builds a new `Runtime` and swaps one reference in `RuntimeStore`;
listeners (the data plane, the admin API) are told and rebuild what they derive from it. Objects
injected at run time (the ACME HTTP-01 challenge SubVS and its rule, the tls-alpn-01 validation
certificates) live beside the config, so a reload of the file never drops them. The heavy, pure
parts of a new generation stay off the event loop's turns: the file is parsed in a child process
(`parse_apart`), the rules are compiled (10,000: over half a second of CPU) in a worker thread
that paces itself (`off_loop`, `pace`), and the garbage collector's full walks wait until the
generation serves (`new_generation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from .config import loader
from .config.model import Config, ContentRule, SubVS, VirtualService, rule_order
from .errors import ConfigError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# While work runs off the loop, the interpreter hands the GIL between threads at least this often
# (seconds; CPython's default is 0.005): the loop, waking up for a request while the thread
# holds the GIL, waits at most about this long for it. None: leave the interval alone.
OFF_LOOP_SWITCH_INTERVAL: float | None = 0.001

_building = 0  # new_generation() sections open (the loop's thread only)
_saved_threshold: tuple[int, int, int] = (0, 0, 0)
_saved_interval = 0.0


@contextlib.contextmanager
def new_generation() -> Iterator[None]:
    """Around building and publishing a generation (a reload: parse, compile, swap): the cyclic
    garbage collector only collects its youngest generation meanwhile. A full collection walks
    every object it tracks, the half-built config and routers included (10,000 rules: about
    50,000 objects, 5-30 ms holding the GIL, in whichever thread happened to allocate), so it
    waits until the new generation serves; the objects that outlived the build are then walked
    once by the next collections, like everything else. Sections nest (the outermost one
    decides); the loop's thread only."""
    global _building, _saved_threshold, _saved_interval
    if _building == 0:
        _saved_threshold = gc.get_threshold()
        _saved_interval = sys.getswitchinterval()
        first, _, _ = _saved_threshold
        if first:  # 0: collection is off, and stays off
            gc.set_threshold(first, 1 << 30, 1 << 30)
        if OFF_LOOP_SWITCH_INTERVAL is not None:
            sys.setswitchinterval(min(_saved_interval, OFF_LOOP_SWITCH_INTERVAL))
    _building += 1
    try:
        yield
    finally:
        _building -= 1
        if _building == 0:
            gc.set_threshold(*_saved_threshold)
            sys.setswitchinterval(_saved_interval)


# How work run by off_loop() leaves the GIL to the loop (seconds): at each pace() after SLICE of
# work it sleeps PAUSE; a sleep that took over BUSY longer than asked found the GIL held (the loop
# is busy) and is followed by BUSY_PAUSE more. An idle loop costs the work ~20% (a 0.1 ms sleep
# takes ~0.17 ms here); a saturated one keeps ~75% of its requests/s (bench/reload_bench.py;
# without pacing the interpreter's hand-overs split the core about 50/50, and every turn of the
# loop took twice as long while a reload compiled).
SLICE = 0.001
PAUSE = 0.0001
BUSY = 0.0005
BUSY_PAUSE = 0.002

# .until: when the running slice ends (0.0: not paced); .busy: the last pause found the loop busy
_pacing = threading.local()


def pace() -> None:
    """A point where long pure work (compiling rules) may let the loop run: a no-op unless the
    calling thread runs it for off_loop() and its slice is used up."""
    until: float = getattr(_pacing, "until", 0.0)
    if not until or time.perf_counter() < until:
        return
    asked = time.perf_counter()
    time.sleep(PAUSE)
    _pacing.busy = busy = time.perf_counter() - asked > PAUSE + BUSY
    if busy:
        time.sleep(BUSY_PAUSE)
    _pacing.until = time.perf_counter() + SLICE


@contextlib.contextmanager
def paced_calls() -> Iterator[None]:
    """Within: pace() at every Python function call this thread makes, for one long library call
    that has no pace() of its own (`re` parsing a trie of thousands of keys: up to 70 ms). The
    profile hook triples that call's time, so it is only set while the last pause found the
    loop busy; a no-op unless the thread runs for off_loop()."""
    if not getattr(_pacing, "until", 0.0) or not getattr(_pacing, "busy", False):
        yield
        return
    previous = sys.getprofile()
    sys.setprofile(_pace_on_call)
    try:
        yield
    finally:
        sys.setprofile(previous)


def _pace_on_call(frame: object, event: str, arg: object) -> None:
    if event == "call":
        pace()


def _paced(call: Callable[[], R]) -> R:
    _pacing.until = time.perf_counter() + SLICE
    _pacing.busy = False
    try:
        return call()
    finally:
        _pacing.until = 0.0


async def off_loop(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` in a worker thread, inside a `new_generation()` section: pure work
    (compiling rules, unpickling a config) that must not hold the loop's turn. The GIL is still
    shared: the section has the interpreter hand it over every millisecond and keeps full
    garbage collections out of the way, and `fn` paces itself where it calls pace()."""
    with new_generation():
        return await asyncio.to_thread(_paced, functools.partial(fn, *args, **kwargs))


# A reload's parse runs in a child process (`parse_apart`): its CPU (10,000 rules: about half a
# second of TOML and validation) then never holds the GIL the serving loop needs. The child is a
# fresh interpreter (spawned, not forked: a fork copies the page tables of the whole process on
# the loop's turn, ~7 ms at 500 MB), at a lower priority, under the parent's rule limit.
_PARSER = "import os; os.nice(10); from lbproxy.runtime import parser_main; parser_main()"
# The rules come back pickled in batches of this many, unpickled between pace() points.
_RULE_BATCH = 200


async def parse_apart(path: Path) -> Config:
    """`load_file(path, to_run=True)` in a child process: the same Config, or the same
    ConfigError. A child that cannot start or dies without an answer is logged and the file
    parsed in a worker thread instead: a reload never fails for want of a process."""
    try:
        data, status = await off_loop(_run_parser, path)
    except OSError as e:
        data, status = b"", f"not started: {e}"
    if status != 0 or not data:
        logger.warning("the config parser process failed (%s); parsing %s in a thread",
                       f"exit status {status}" if isinstance(status, int) else status, path)
        return await off_loop(loader.load_file, path, to_run=True)
    return await off_loop(_unpack_config, data)


def _run_parser(path: Path) -> tuple[bytes, int | str]:
    """The child's answer and exit status (blocking: runs in a worker thread; Popen uses vfork,
    so starting the child costs the process next to nothing)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARSER, str(path), str(vars(loader)["MAX_RULES"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    return out, proc.returncode


def parser_main() -> None:
    """The child of parse_apart: `load_file(argv[1], to_run=True)` with at most argv[2] rules,
    the outcome pickled on stdout."""
    path, limit = sys.argv[1], int(sys.argv[2])
    vars(loader)["MAX_RULES"] = limit  # the limit load_file applies (lifted by benches, tests)
    out: tuple[object, ...]
    try:
        cfg = loader.load_file(path, to_run=True)
    except ConfigError as e:
        out = ("problems", list(e.problems))
    else:
        rules = cfg.rules
        out = ("config", pickle.dumps(dataclasses.replace(cfg, rules=())),
               [pickle.dumps(rules[i:i + _RULE_BATCH]) for i in range(0, len(rules), _RULE_BATCH)])
    sys.stdout.buffer.write(pickle.dumps(out))
    sys.stdout.buffer.flush()


def _unpack_config(data: bytes) -> Config:
    kind, *rest = pickle.loads(data)
    if kind == "problems":
        raise ConfigError(rest[0])
    head, batches = rest
    rules: list[ContentRule] = []
    for batch in batches:
        rules.extend(pickle.loads(batch))
        pace()
    cfg: Config = dataclasses.replace(pickle.loads(head), rules=tuple(rules))
    return cfg


@dataclass(frozen=True, slots=True)
class Injection:
    """A SubVS and its content rule added to a VS at run time, with first precedence."""

    vs: str
    subvs: SubVS
    rule: ContentRule
    host: str = ""  # the name whose http-01 challenge it answers (lower case, no trailing dot)


@dataclass(frozen=True, slots=True)
class AlpnValidation:
    """A tls-alpn-01 validation in progress (RFC 8737): the HTTPS VS `vs` answers a handshake
    for `host` offering ALPN "acme-tls/1" alone with this self-signed certificate (PEM) and
    key; every other handshake of the name gets the normal certificate (proxy/tls.py)."""

    vs: str
    host: str  # lower case, no trailing dot
    token: str
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never show the key
        return f"AlpnValidation(vs={self.vs!r}, host={self.host!r}, token={self.token!r})"


@dataclass(frozen=True, slots=True)
class Runtime:
    generation: int
    config: Config
    injections: tuple[Injection, ...] = ()
    validations: tuple[AlpnValidation, ...] = ()

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
            lambda rt: Runtime(rt.generation + 1, config, rt.injections, rt.validations))

    async def inject(self, injection: Injection) -> Runtime:
        def make(rt: Runtime) -> Runtime:
            rest = tuple(i for i in rt.injections
                         if not (i.vs == injection.vs and i.subvs.name == injection.subvs.name))
            return Runtime(rt.generation + 1, rt.config, (*rest, injection), rt.validations)
        return await self._publish(make)

    async def remove(self, vs: str, subvs: str) -> Runtime:
        return await self._publish(lambda rt: Runtime(
            rt.generation + 1, rt.config,
            tuple(i for i in rt.injections if not (i.vs == vs and i.subvs.name == subvs)),
            rt.validations))

    async def add_validation(self, validation: AlpnValidation) -> Runtime:
        """Serve a tls-alpn-01 validation certificate (replacing one for the same VS, host and
        token); every listener (each worker too) has it when this returns."""
        def make(rt: Runtime) -> Runtime:
            rest = tuple(v for v in rt.validations if (v.vs, v.host, v.token) !=
                         (validation.vs, validation.host, validation.token))
            return Runtime(rt.generation + 1, rt.config, rt.injections, (*rest, validation))
        return await self._publish(make)

    async def remove_validation(self, vs: str, host: str, token: str) -> Runtime:
        return await self._publish(lambda rt: Runtime(
            rt.generation + 1, rt.config, rt.injections,
            tuple(v for v in rt.validations if (v.vs, v.host, v.token) != (vs, host, token))))
