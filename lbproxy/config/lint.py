"""Routing a valid config allows but no request can take: SubVSs no rule leads to, rules that never
run (warnings for `lbproxy check`, never errors: the file still loads).

Content switching (routing/router.py) walks a VS's rules in precedence order and the first match
picks its SubVS; `default` matches everything, so rules after it never run; a rule that sets a
flag only marks the request, and a fail_on_match rule refuses it: neither picks a SubVS. A SubVS
is reachable when some rule before (or being) `default` can pick it.
"""

from __future__ import annotations

from ..errors import ConfigProblem
from .model import DEFAULT_RULE, Config, ContentRule, VirtualService, VSKind, rule_order


def _picks(rule: ContentRule | None) -> bool:
    """Whether a matching rule sends the request to its SubVS (None: `default`)."""
    return rule is None or not (rule.set_flag or rule.fail_on_match)


def _vs_warnings(i: int, vs: VirtualService, rules: dict[str, ContentRule]
                 ) -> list[ConfigProblem]:
    if vs.kind is VSKind.REDIRECT or vs.real_servers or not vs.subvs:
        return []
    out = []
    if not vs.content_switching:
        if any(s.rules for s in vs.subvs):
            out.append(ConfigProblem(f"vs[{i}].content_switching", (
                "is false, so the rules of its SubVSs are not used: each request goes to the "
                "first SubVS (in file order) with a real server available")))
        return out
    order = rule_order(vs)
    cut = next((k for k, (rn, _) in enumerate(order) if rn == DEFAULT_RULE), len(order) - 1)
    live, dead = order[:cut + 1], {rn for rn, _ in order[cut + 1:]}
    chosen = {sn for rn, sn in live if _picks(None if rn == DEFAULT_RULE else rules.get(rn))}
    for j, s in enumerate(vs.subvs):
        where = f"vs[{i}].subvs[{j}]"
        for k, rn in enumerate(s.rules):
            if rn in dead:
                out.append(ConfigProblem(f"{where}.rules[{k}]", (
                    f"rule {rn!r} comes after 'default' in this VS's precedence and never runs "
                    "('default' matches every request)")))
        if s.name in chosen:
            continue
        if not s.rules:
            why = ("has no rules, so content switching never sends a request to it; list the "
                   "rules that pick it in rules = [...] ('default' takes what no other rule "
                   "matches)")
        elif all(rn in dead for rn in s.rules):
            why = "is never reached: all its rules come after 'default'"
        else:
            why = ("is never chosen: its rules only set flags (set_flag) or refuse requests "
                   "(fail_on_match), which never pick a SubVS")
        out.append(ConfigProblem(where, why))
    return out


def routing_warnings(cfg: Config) -> list[ConfigProblem]:
    """Unreachable SubVSs, rules that never run, rules no SubVS uses; paths as the loader's."""
    rules = {r.name: r for r in cfg.rules}
    out: list[ConfigProblem] = []
    used: set[str] = set()
    for i, vs in enumerate(cfg.virtual_services):
        used.update(rn for s in vs.subvs for rn in s.rules)
        out += _vs_warnings(i, vs, rules)
    out += [ConfigProblem(f"rule[{k}]", "is not used by any SubVS (no VS can match it)")
            for k, r in enumerate(cfg.rules) if r.name not in used]
    return out


def names_of(cfg: Config) -> dict[str, object]:
    """The names `locate.label_of` reads, shaped like the TOML data the config came from."""
    return {"vs": [{"name": vs.name, "subvs": [{"name": s.name} for s in vs.subvs]}
                   for vs in cfg.virtual_services],
            "rule": [{"name": r.name} for r in cfg.rules],
            "certificate": [{"id": c.id} for c in cfg.certificates]}


__all__ = ["names_of", "routing_warnings"]
