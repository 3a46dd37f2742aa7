"""`vs convert`: moving a VS's Real Servers into a SubVS reached by the default rule, so that the
VS can take challenge SubVSs (see challenge.ineligibility), kept in the config file; and the
manager's own way to apply the file when no composition root gives one."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..config.loader import load_file
from ..config.model import DEFAULT_RULE, Config, SubVS, VirtualService
from ..config.writer import ConfigFile, convert_vs_edit
from ..errors import ConfigError, ConfigProblem, StoreError
from ..runtime import RuntimeStore
from .blocking import on_thread

logger = logging.getLogger(__name__)


async def convert_vs(runtime: RuntimeStore, config_file: ConfigFile, name: str) -> dict[str, Any]:
    """Move a VS's Real Servers into a new SubVS `<vs>-rs` reached by the default rule: written
    into the config file, then applied through the reload path. A file that cannot be written
    refuses it (ConfigWriteError carrying the TOML to put in by hand) and nothing changes."""
    cfg = runtime.current.config
    vs = cfg.vs_by_name(name)
    if vs is None:
        raise StoreError(f"no virtual service {name!r}", status=404)
    if not vs.real_servers:
        raise StoreError(f"VS {name!r} has no Real Servers on the parent; nothing to convert",
                         status=409)
    sub_name = f"{name}-rs"
    if vs.subvs_by_name(sub_name) is not None:
        raise StoreError(f"VS {name!r} already has a SubVS {sub_name!r}", status=409)
    sub = SubVS(name=sub_name, real_servers=vs.real_servers, scheduler=vs.scheduler,
                rules=(DEFAULT_RULE,), health_check=vs.health_check,
                not_available=vs.not_available)
    snippet = convert_snippet(vs, sub)
    await config_file.edit(convert_vs_edit(name, sub_name), running=cfg,
                           what=f"`vs convert {name}`", snippet=snippet)
    return {"vs": name, "subvs": sub_name, "runtime_only": False,
            "config_file": str(config_file.path), "toml": snippet}


def reload_from_file(runtime: RuntimeStore, path: Path | None,
                     sync: Callable[[Config], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """The reload path of a manager wired without a composition root (tests, tools): read the
    file, run it, sync its certificates. Raises only while the old config still runs."""
    async def apply() -> None:
        if path is None:
            raise ConfigError([ConfigProblem("<config>", "no config file to reload")])
        cfg = await on_thread(lambda: load_file(path, to_run=True))
        await runtime.set_config(cfg)
        try:
            await sync(cfg)
        except Exception:
            # The new config runs; its certificates are looked at again at the next sync.
            logger.exception("applied %s, but its certificates could not be synced", path)
    return apply


def convert_snippet(vs: VirtualService, sub: SubVS) -> str:
    """The TOML a `vs convert` writes (for the operator who edits the file by hand)."""
    lines = [f"# in [[vs]] name = {json.dumps(vs.name)}: remove its [[vs.real_servers]] and add",
             "[[vs.subvs]]", f"name = {json.dumps(sub.name)}", 'rules = ["default"]',
             f"scheduler = {json.dumps(sub.scheduler.value)}"]
    for rs in sub.real_servers:
        lines += ["[[vs.subvs.real_servers]]", f"address = {json.dumps(str(rs.address))}"]
        if rs.weight != 1:
            lines.append(f"weight = {rs.weight}")
        if not rs.enabled:
            lines.append("enabled = false")
    return "\n".join(lines) + "\n"
