"""Run-time real-server control: the operator's enable / disable / drain / weight overrides on top
of the config file, how they follow reloads, and the file that keeps them across restarts.

An override belongs to one real server of one pool (a VS's own servers, or a SubVS's), keyed
(VS, SubVS or "", address); naming only an address sets it in every pool that has that address
(LoadMaster's global real-server enable/disable). Its effect, sent to the data plane as a
`ServerTable` (a single process's `DataPlane`, or every worker through the `Supervisor`):

- "disabled" and "drain": the server takes no new request (the balancer skips it, as for a
  server the config disables); requests already sent to it finish; idle pooled connections to
  it are closed and a connection that finishes a request is closed, not pooled (once no pool
  has the address enabled). The two differ in intent only: "drain" is the step before
  maintenance, watched until `active` falls to 0.
- "enabled": takes requests (also a server the config disables: the override wins).
- a weight (0..65535, as the config allows): replaces the config's weight.

An override records the config's enabled flag and weight when it was set. A reload keeps it while
the file still says the same of that server, and drops it (logged) when the file changes the
server's weight or enabled flag (the file wins) or no longer has the server. An override that
ends up equal to the config is dropped at once. The overrides are kept in
<state_dir>/server-state.json (written on every change), so a restart keeps them, checked
against the config the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config.diff import server_name
from .config.loader import parse_address
from .config.model import Config, RealServer, VSKind
from .errors import AdminError, ConfigError
from .runtime import Runtime

logger = logging.getLogger(__name__)

STATES = ("enabled", "disabled", "drain")
# The weights the config accepts (config.loader: weight 0..65535; 0 takes no new requests).
MIN_WEIGHT = 0
MAX_WEIGHT = 65535
STATE_FILE = "server-state.json"
_FILE_VERSION = 1

Key = tuple[str, str, str]  # (VS, SubVS name or "" for the VS's own servers, address)
# (VS, SubVS or "") -> address -> (state, weight): what an override makes of each server it
# covers (servers without one: the config's). Plain data: it crosses the workers' channel.
ServerTable = Mapping[tuple[str, str], Mapping[str, tuple[str, int]]]


@dataclass(frozen=True, slots=True)
class Override:
    """One server's run-time setting; None: the config's. `config_*`: the config's values when
    it was set (a reload that changes them drops it)."""

    state: str | None
    weight: int | None
    config_enabled: bool
    config_weight: int

    def effective(self) -> tuple[str, int]:
        state = self.state or ("enabled" if self.config_enabled else "disabled")
        return state, self.config_weight if self.weight is None else self.weight

    def is_noop(self) -> bool:
        return self.effective() == (config_state(self.config_enabled), self.config_weight)


def config_state(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


def pool_servers(config: Config) -> Iterator[tuple[str, str, RealServer]]:
    """(VS, SubVS or "", server) for every real server of every pool the data plane builds
    (as proxy.service.pool_specs: a VS's own servers, else its SubVSs'; none for a redirect)."""
    for vs in config.virtual_services:
        if vs.kind is VSKind.REDIRECT:
            continue
        if vs.real_servers:
            for rs in vs.real_servers:
                yield vs.name, "", rs
            continue
        for s in vs.subvs:
            for rs in s.real_servers:
                yield vs.name, s.name, rs


def _same_address(given: str) -> Callable[[str], bool]:
    """Matches a configured address (`str(Address)`) against what an operator typed: the same
    text, or the same host and port once parsed ("[::1]:80" and "::1 80" spellings aside)."""
    try:
        parsed = str(parse_address(given))
    except (ConfigError, ValueError):
        parsed = given
    return lambda configured: configured in (given, parsed)


class ServerControl:
    """The overrides in force; `push` is told the whole table after every change."""

    def __init__(self, state_file: Path | None = None,
                 push: Callable[[ServerTable], None] | None = None) -> None:
        self._file = state_file
        self.push = push
        self._overrides: dict[Key, Override] = {}

    # -- what the data plane and the API read ---------------------------------------------------

    def table(self) -> dict[tuple[str, str], dict[str, tuple[str, int]]]:
        out: dict[tuple[str, str], dict[str, tuple[str, int]]] = {}
        for (vs, subvs, addr), ov in self._overrides.items():
            out.setdefault((vs, subvs), {})[addr] = ov.effective()
        return out

    def overrides(self) -> dict[Key, Override]:
        return dict(self._overrides)

    def view(self, config: Config) -> list[dict[str, Any]]:
        """Every real server of every pool as the API shows it: effective state and weight, the
        config's, and the override (None when the config rules)."""
        rows = []
        for vs, subvs, rs in pool_servers(config):
            rows.append(self._row(vs, subvs, rs))
        return rows

    def _row(self, vs: str, subvs: str, rs: RealServer) -> dict[str, Any]:
        addr = str(rs.address)
        ov = self._overrides.get((vs, subvs, addr))
        state, weight = (ov.effective() if ov is not None
                         else (config_state(rs.enabled), rs.weight))
        return {"name": server_name(vs, subvs, addr), "vs": vs, "subvs": subvs,
                "address": addr, "state": state, "weight": weight,
                "config": {"enabled": rs.enabled, "weight": rs.weight},
                "override": None if ov is None else {"state": ov.state, "weight": ov.weight}}

    # -- changes --------------------------------------------------------------------------------

    def set(self, config: Config, address: str, *, vs: str | None = None,
            subvs: str | None = None, state: str | None = None,
            weight: int | None = None) -> list[dict[str, Any]]:
        """Set `state` and/or `weight` of `address` in every pool that has it (only VS `vs`,
        only SubVS `subvs` of it, when given); the rows of the servers it covered. Raises
        AdminError (400: bad value; 404: no such VS, SubVS or server there)."""
        if state is None and weight is None:
            raise AdminError("give a state (enabled, disabled, drain) or a weight, or both")
        if state is not None and state not in STATES:
            raise AdminError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        if weight is not None and not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise AdminError(f"weight must be between {MIN_WEIGHT} and {MAX_WEIGHT}, got {weight}")
        if subvs is not None and vs is None:
            raise AdminError("a SubVS is named within its VS: give vs too")
        if vs is not None and config.vs_by_name(vs) is None:
            raise AdminError(f"no virtual service {vs!r}", status=404)
        if vs is not None and subvs is not None:
            v = config.vs_by_name(vs)
            if v is None or all(s.name != subvs for s in v.subvs):
                raise AdminError(f"virtual service {vs!r} has no SubVS {subvs!r}", status=404)
        same = _same_address(address)
        hits = [(v, s, rs) for v, s, rs in pool_servers(config)
                if same(str(rs.address)) and (vs is None or v == vs)
                and (subvs is None or s == subvs)]
        if not hits:
            where = (f" in SubVS {subvs!r} of VS {vs!r}" if subvs is not None
                     else f" in VS {vs!r}" if vs is not None else "")
            raise AdminError(f"no real server {address}{where}", status=404)
        rows = []
        for vs_name, s, rs in hits:
            key = (vs_name, s, str(rs.address))
            old = self._overrides.get(key)
            ov = Override(state if state is not None else (old.state if old else None),
                          weight if weight is not None else (old.weight if old else None),
                          rs.enabled, rs.weight)
            before = old.effective() if old else (config_state(rs.enabled), rs.weight)
            if ov.is_noop():
                self._overrides.pop(key, None)
            else:
                self._overrides[key] = ov
            after = ov.effective()
            if after != before or old != self._overrides.get(key):
                logger.info("real server %s: %s, weight %d (was %s, weight %d)%s",
                            server_name(*key), after[0], after[1], before[0], before[1],
                            "; the config's setting again" if ov.is_noop() else "")
            rows.append(self._row(vs_name, s, rs))
        self._changed()
        return rows

    def reconcile(self, config: Config) -> list[str]:
        """Drop the overrides `config` no longer allows: the server is gone from its pool, or
        the file changed its weight or enabled flag (the file wins). Logs and returns why, one
        line each."""
        configured = {(v, s, str(rs.address)): rs for v, s, rs in pool_servers(config)}
        dropped = []
        for key, ov in list(self._overrides.items()):
            rs = configured.get(key)
            if rs is None:
                why = "no longer in the config"
            elif (rs.enabled, rs.weight) != (ov.config_enabled, ov.config_weight):
                why = (f"the config changed it (enabled {str(ov.config_enabled).lower()}, "
                       f"weight {ov.config_weight} -> enabled {str(rs.enabled).lower()}, "
                       f"weight {rs.weight}); the file wins")
            else:
                continue
            del self._overrides[key]
            line = f"override of real server {server_name(*key)} dropped: {why}"
            logger.warning("%s", line)
            dropped.append(line)
        return dropped

    async def on_runtime(self, rt: Runtime) -> None:
        """A RuntimeStore listener (subscribed before the data plane's, so that a generation is
        served with the overrides it allows): drop what the new config no longer allows, and
        tell the data plane (which lays the table it has over every generation it builds)."""
        if self.reconcile(rt.config):
            self._changed()

    def _changed(self) -> None:
        self.save()
        if self.push is not None:
            self.push(self.table())

    # -- the state file -------------------------------------------------------------------------

    def save(self) -> None:
        """Write every override to the state file (atomically); a failure is logged, the
        overrides stay in force."""
        if self._file is None:
            return
        doc = {"version": _FILE_VERSION, "servers": [
            {"vs": vs, "subvs": subvs, "address": addr, "state": ov.state, "weight": ov.weight,
             "config": {"enabled": ov.config_enabled, "weight": ov.config_weight}}
            for (vs, subvs, addr), ov in self._overrides.items()]}
        tmp = self._file.with_name(self._file.name + ".tmp")
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._file)
        except OSError as e:
            logger.error("cannot write %s (real-server overrides kept in memory only): %s",
                         self._file, e)

    def load(self, config: Config) -> None:
        """Read the state file (absent: nothing), keep what `config` still allows (reconcile)
        and tell the data plane. A damaged file or entry is logged and ignored."""
        if self._file is None:
            return
        try:
            doc = json.loads(self._file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            logger.error("%s is unreadable (%s); starting without real-server overrides",
                         self._file, e)
            return
        entries = doc.get("servers") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or doc.get("version") != _FILE_VERSION:
            logger.error("%s is not a version %d server-state file; ignored", self._file,
                         _FILE_VERSION)
            return
        for i, item in enumerate(entries):
            parsed = _entry(item)
            if parsed is None:
                logger.error("%s: entry %d is malformed; ignored", self._file, i)
                continue
            key, ov = parsed
            self._overrides[key] = ov
        if self._overrides:
            logger.info("%d real-server override(s) read from %s", len(self._overrides),
                        self._file)
        if self.reconcile(config):
            self.save()
        if self.push is not None:
            self.push(self.table())


def _entry(e: Any) -> tuple[Key, Override] | None:
    if not isinstance(e, Mapping):
        return None
    vs, subvs, addr, state, weight, cfg = (e.get("vs"), e.get("subvs"), e.get("address"),
                                           e.get("state"), e.get("weight"), e.get("config"))
    if not (isinstance(vs, str) and isinstance(subvs, str) and isinstance(addr, str)
            and (state is None or state in STATES) and isinstance(cfg, Mapping)):
        return None
    ce, cw = cfg.get("enabled"), cfg.get("weight")
    if not (weight is None or _is_weight(weight)) or not isinstance(ce, bool) \
            or not isinstance(cw, int) or not _is_weight(cw):
        return None
    return (vs, subvs, addr), Override(state, weight, ce, cw)


def _is_weight(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and MIN_WEIGHT <= v <= MAX_WEIGHT
