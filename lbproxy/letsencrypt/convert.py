"""`vs convert`: moving a VS's Real Servers into a SubVS reached by the default rule, so that the
VS can take challenge SubVSs (see challenge.ineligibility), and the TOML that keeps it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..config.model import DEFAULT_RULE, SubVS, VirtualService
from ..errors import StoreError
from ..runtime import RuntimeStore


async def convert_vs(runtime: RuntimeStore, name: str) -> dict[str, Any]:
    """Move a VS's Real Servers into a new SubVS `<vs>-rs` reached by the default rule, at
    run time only; the answer carries the TOML to put in the config file."""
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
    new_vs = dataclasses.replace(vs, real_servers=(), subvs=(sub,), content_switching=True,
                                 precedence=())
    new_cfg = dataclasses.replace(cfg, virtual_services=tuple(
        new_vs if v.name == name else v for v in cfg.virtual_services))
    await runtime.set_config(new_cfg)
    return {"vs": name, "subvs": sub_name, "runtime_only": True,
            "toml": convert_snippet(vs, sub)}


def convert_snippet(vs: VirtualService, sub: SubVS) -> str:
    """The TOML that keeps a `vs convert` across restarts (replace the VS's real_servers)."""
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
