"""Per-status-code counters (`codes`) through merge_stats: summed code by code at every level
(VS, SubVS, real server), in code order, beside the `responses` classes."""

from __future__ import annotations

from typing import Any

from lbproxy.workers.merge import merge_stats


def part(codes: dict[str, int]) -> dict[str, Any]:
    server = {"address": "10.0.0.1:80", "codes": dict(codes)}
    return {"virtual_services": {"web": {
        "codes": dict(codes), "real_servers": [server],
        "subvs": {"api": {"codes": dict(codes), "real_servers": [dict(server)]}}}},
        "draining_listeners": 0, "upstream_pools": {}}


def test_codes_are_summed_code_by_code_in_code_order() -> None:
    a = part({"200": 5, "404": 1})
    b = part({"200": 2, "302": 1, "503": 4})
    merged = merge_stats([a, b])
    web = merged["virtual_services"]["web"]
    expected = {"200": 7, "302": 1, "404": 1, "503": 4}
    for codes in (web["codes"], web["real_servers"][0]["codes"],
                  web["subvs"]["api"]["codes"], web["subvs"]["api"]["real_servers"][0]["codes"]):
        assert codes == expected and list(codes) == ["200", "302", "404", "503"]
    assert a == part({"200": 5, "404": 1})  # parts are not modified


def test_a_part_without_codes_adds_nothing() -> None:
    old = part({})
    del old["virtual_services"]["web"]["codes"]
    merged = merge_stats([old, part({"201": 3})])
    assert merged["virtual_services"]["web"]["codes"] == {"201": 3}
