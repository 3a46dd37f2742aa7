"""Run-time real-server control: the overrides (lbproxy.servercontrol) on their own, the balancer
laying them over the config, and a running App (one process) whose real servers are drained,
disabled, enabled and reweighted through the admin API, counted at the real servers."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from lbproxy.config import parse_config
from lbproxy.config.model import Address, RealServer, Scheduler
from lbproxy.errors import AdminError
from lbproxy.proxy.balancer import Balancer
from lbproxy.servercontrol import STATE_FILE, ServerControl, ServerTable
from tests.support.opsapp import STEP, backends, free_port, head, running

CONFIG = """
[[vs]]
name = "web"
listen = "127.0.0.1:8080"
real_servers = [ { address = "10.0.0.1:80" }, { address = "10.0.0.2:80", weight = 3 } ]
[[vs]]
name = "shop"
listen = "127.0.0.1:8081"
  [[vs.subvs]]
  name = "api"
  rules = ["default"]
  real_servers = [ { address = "10.0.0.1:80" }, { address = "10.0.0.3:80", enabled = false } ]
"""


def control(tmp_path: Path | None = None) -> tuple[ServerControl, list[ServerTable]]:
    pushed: list[ServerTable] = []
    sc = ServerControl(tmp_path / STATE_FILE if tmp_path else None, push=pushed.append)
    return sc, pushed


# -- the overrides ----------------------------------------------------------------------------

def test_an_address_alone_covers_every_pool_that_has_it() -> None:
    cfg = parse_config(CONFIG)
    sc, pushed = control()
    rows = sc.set(cfg, "10.0.0.1:80", state="drain")
    assert [r["name"] for r in rows] == ["web 10.0.0.1:80", "shop/api 10.0.0.1:80"]
    assert all(r["state"] == "drain" and r["weight"] == 1 for r in rows)
    assert pushed[-1] == {("web", ""): {"10.0.0.1:80": ("drain", 1)},
                          ("shop", "api"): {"10.0.0.1:80": ("drain", 1)}}


def test_vs_and_subvs_narrow_it() -> None:
    cfg = parse_config(CONFIG)
    sc, pushed = control()
    sc.set(cfg, "10.0.0.1:80", vs="shop", subvs="api", state="disabled")
    assert pushed[-1] == {("shop", "api"): {"10.0.0.1:80": ("disabled", 1)}}
    sc.set(cfg, "10.0.0.2:80", vs="web", weight=7)
    assert pushed[-1][("web", "")] == {"10.0.0.2:80": ("enabled", 7)}
    # A state and a weight set apart make one override.
    sc.set(cfg, "10.0.0.2:80", state="drain")
    assert pushed[-1][("web", "")] == {"10.0.0.2:80": ("drain", 7)}


def test_an_override_equal_to_the_config_is_dropped() -> None:
    cfg = parse_config(CONFIG)
    sc, pushed = control()
    sc.set(cfg, "10.0.0.1:80", state="disabled")
    sc.set(cfg, "10.0.0.1:80", state="enabled")
    assert pushed[-1] == {} and sc.overrides() == {}
    # A server the config disables is enabled by an override, and disabled again by dropping it.
    sc.set(cfg, "10.0.0.3:80", state="enabled")
    assert pushed[-1] == {("shop", "api"): {"10.0.0.3:80": ("enabled", 1)}}
    sc.set(cfg, "10.0.0.3:80", state="disabled")
    assert sc.overrides() == {}


@pytest.mark.parametrize(("kwargs", "status", "says"), [
    ({"address": "10.0.0.9:80", "state": "drain"}, 404, "no real server 10.0.0.9:80"),
    ({"address": "10.0.0.2:80", "vs": "shop", "state": "drain"}, 404,
     "no real server 10.0.0.2:80 in VS 'shop'"),
    ({"address": "10.0.0.1:80", "vs": "nope", "state": "drain"}, 404, "no virtual service"),
    ({"address": "10.0.0.1:80", "vs": "shop", "subvs": "x", "state": "drain"}, 404,
     "has no SubVS 'x'"),
    ({"address": "10.0.0.1:80", "subvs": "api", "state": "drain"}, 400, "give vs too"),
    ({"address": "10.0.0.1:80"}, 400, "give a state"),
    ({"address": "10.0.0.1:80", "state": "off"}, 400, "state must be one of"),
    ({"address": "10.0.0.1:80", "weight": 65536}, 400, "between 0 and 65535"),
])
def test_refusals_name_what_is_wrong(kwargs: dict[str, object], status: int, says: str) -> None:
    sc, pushed = control()
    address = str(kwargs.pop("address"))
    with pytest.raises(AdminError) as e:
        sc.set(parse_config(CONFIG), address, **kwargs)  # type: ignore[arg-type]
    assert e.value.status == status and says in str(e.value)
    assert pushed == [] and sc.overrides() == {}


def test_a_reload_keeps_overrides_until_the_file_changes_that_server(
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config(CONFIG)
    sc, _ = control()
    sc.set(cfg, "10.0.0.1:80", state="drain")
    sc.set(cfg, "10.0.0.2:80", weight=9)
    # Unrelated changes (another VS's listener, drain_timeout): every override stays.
    assert sc.reconcile(parse_config("drain_timeout = 3\n" + CONFIG.replace("8081", "9091"))) == []
    assert len(sc.overrides()) == 3
    # The file gives 10.0.0.2 another weight: its override goes, the others stay.
    caplog.set_level(logging.WARNING)
    dropped = sc.reconcile(parse_config(CONFIG.replace("weight = 3", "weight = 4")))
    assert dropped == ["override of real server web 10.0.0.2:80 dropped: the config changed it "
                       "(enabled true, weight 3 -> enabled true, weight 4); the file wins"]
    assert dropped[0] in caplog.text
    assert set(sc.table()) == {("web", ""), ("shop", "api")}
    assert "10.0.0.2:80" not in sc.table()[("web", "")]
    # The file disables 10.0.0.1 in web, and the SubVS loses it: both overrides go.
    gone = CONFIG.replace('{ address = "10.0.0.1:80" }, { address = "10.0.0.2:80"',
                          '{ address = "10.0.0.1:80", enabled = false }, '
                          '{ address = "10.0.0.2:80"').replace(
        '{ address = "10.0.0.1:80" }, { address = "10.0.0.3:80"', '{ address = "10.0.0.3:80"')
    dropped = sc.reconcile(parse_config(gone))
    assert sorted(dropped) == [
        "override of real server shop/api 10.0.0.1:80 dropped: no longer in the config",
        "override of real server web 10.0.0.1:80 dropped: the config changed it (enabled true, "
        "weight 1 -> enabled false, weight 1); the file wins"]
    assert sc.overrides() == {}


async def test_on_runtime_pushes_the_reconciled_table() -> None:
    from lbproxy.runtime import Runtime

    cfg = parse_config(CONFIG)
    sc, pushed = control()
    sc.set(cfg, "10.0.0.2:80", weight=9)
    await sc.on_runtime(Runtime(2, parse_config(CONFIG.replace("weight = 3", "weight = 4"))))
    assert pushed[-1] == {}


def test_the_state_file_keeps_overrides_across_a_restart(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG)
    sc, _ = control(tmp_path)
    sc.set(cfg, "10.0.0.1:80", vs="web", state="drain")
    sc.set(cfg, "10.0.0.2:80", weight=0)
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    assert doc["version"] == 1 and len(doc["servers"]) == 2
    again, pushed = control(tmp_path)
    again.load(cfg)
    assert pushed[-1] == {("web", ""): {"10.0.0.1:80": ("drain", 1), "10.0.0.2:80": ("enabled", 0)}}
    # Restarted with a file that changed 10.0.0.2's weight meanwhile: that one is dropped,
    # and the state file says so.
    third, pushed = control(tmp_path)
    third.load(parse_config(CONFIG.replace("weight = 3", "weight = 2")))
    assert pushed[-1] == {("web", ""): {"10.0.0.1:80": ("drain", 1)}}
    assert len(json.loads((tmp_path / STATE_FILE).read_text())["servers"]) == 1


@pytest.mark.parametrize("content", [
    "not json", '{"version": 2, "servers": []}', '[]',
    '{"version": 1, "servers": [{"vs": "web"}, 3]}',
])
def test_a_damaged_state_file_is_logged_and_ignored(tmp_path: Path, content: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    sc, _ = control(tmp_path)
    caplog.set_level(logging.ERROR)
    sc.load(parse_config(CONFIG))
    assert sc.overrides() == {}
    assert STATE_FILE in caplog.text


def test_the_balancer_lays_overrides_over_the_config() -> None:
    servers = (RealServer(Address("10.0.0.1", 80), 2), RealServer(Address("10.0.0.2", 80), 1),
               RealServer(Address("10.0.0.3", 80), 1, enabled=False))
    bal = Balancer(servers, Scheduler.WEIGHTED_ROUND_ROBIN)
    bal.administer(servers, {"10.0.0.1:80": ("drain", 2), "10.0.0.3:80": ("enabled", 5)})
    a, b, c = bal.backends
    assert (a.state, a.enabled, b.state, c.state, c.enabled, c.weight) == (
        "drain", False, "enabled", "enabled", True, 5)
    picks = [bal.pick("", "") for _ in range(12)]
    assert a not in picks and picks.count(c) == 10 and picks.count(b) == 2
    bal.administer(servers, {})  # back to the config
    assert (a.state, a.enabled, c.state, c.enabled, c.weight) == (
        "enabled", True, "disabled", False, 1)
    # A new generation adopts the backends with the config's state again (the data plane
    # then lays the overrides over it).
    a.state, a.enabled = "drain", False
    again = Balancer(servers, Scheduler.WEIGHTED_ROUND_ROBIN, previous=bal)
    assert again.backends[0] is a and (a.state, a.enabled) == ("enabled", True)


# -- a running App ------------------------------------------------------------------------------

def _two(web: int, admin: int, b: list[str], *, scheduler: str = "rr",
         weights: tuple[int, int] = (1, 1)) -> str:
    return head(admin) + f"""
[[vs]]
name = "web"
listen = "127.0.0.1:{web}"
scheduler = "{scheduler}"
health_check = {{ type = "none" }}
real_servers = [ {{ address = "{b[0]}", weight = {weights[0]} }},
                 {{ address = "{b[1]}", weight = {weights[1]} }} ]
"""


async def test_drain_lets_the_request_in_flight_finish_and_sends_no_new_ones(
        tmp_path: Path) -> None:
    async with backends(2) as bk:
        addrs = [bk.address(0), bk.address(1)]
        admin = free_port()
        async with running(tmp_path, _two(free_port(), admin, addrs), admin_port=admin) as r:
            # Warm both pools: a kept-alive upstream connection to each.
            for _ in range(4):
                assert (await r.get("web"))[0] == 200
            assert bk.hits == {"b0": 2, "b1": 2}
            # A slow request in flight on b0 or b1; drain the one that has it.
            slow = asyncio.create_task(r.get("web", "/slow"))
            busy = await bk.slow_one()
            status, answer = await r.api("POST", "/api/servers",
                                         {"address": addrs[busy], "state": "drain"})
            assert status == 200, answer
            assert answer["servers"][0]["state"] == "drain"
            assert answer["servers"][0]["active"] == 1  # the slow one, still in flight
            before = bk.hits.copy()
            # New requests, on the kept-alive client connection and on fresh ones: none to it.
            for i in range(10):
                assert await r.get("web", fresh=bool(i % 2)) == (200, f"b{1 - busy}")
            assert bk.hits[f"b{busy}"] == before[f"b{busy}"]
            # Its idle pooled connections were closed; the one in flight finishes, 200.
            pools = r.app.dataplane.stats()["upstream_pools"]
            assert pools[addrs[busy]]["idle"] == 0
            bk.release.set()
            assert await asyncio.wait_for(slow, STEP) == (200, f"b{busy}")
            # ...and is closed, not pooled, once done.
            assert r.app.dataplane.stats()["upstream_pools"][addrs[busy]]["idle"] == 0
            _, listing = await r.api("GET", "/api/servers")
            row = next(s for s in listing["servers"] if s["address"] == addrs[busy])
            assert (row["state"], row["active"], row["override"]) == (
                "drain", 0, {"state": "drain", "weight": None})
            # Shown in the status and the stats.
            _, status_doc = await r.api("GET", "/api/status")
            rs = {s["address"]: s for s in status_doc["services"][0]["real_servers"]}
            assert rs[addrs[busy]]["state"] == "drain" and rs[addrs[busy]]["enabled"] is False
            assert rs[addrs[1 - busy]]["state"] == "enabled"
            # Enabled again: it takes requests again.
            status, _ = await r.api("POST", "/api/servers",
                                    {"address": addrs[busy], "state": "enabled"})
            assert status == 200
            got = {(await r.get("web"))[1] for _ in range(4)}
            assert got == {"b0", "b1"}


async def test_disable_enable_and_weight_change_the_distribution(tmp_path: Path) -> None:
    async with backends(2) as bk:
        addrs = [bk.address(0), bk.address(1)]
        admin = free_port()
        text = _two(free_port(), admin, addrs, scheduler="wrr")
        async with running(tmp_path, text, admin_port=admin) as r:
            async def spread(n: int) -> dict[str, int]:
                bk.hits.clear()
                for _ in range(n):
                    assert (await r.get("web"))[0] == 200
                return dict(bk.hits)

            assert await spread(20) == {"b0": 10, "b1": 10}
            await r.api("POST", "/api/servers", {"address": addrs[1], "state": "disabled"})
            assert await spread(10) == {"b0": 10}
            await r.api("POST", "/api/servers", {"address": addrs[1], "state": "enabled"})
            status, answer = await r.api("POST", "/api/servers",
                                         {"address": addrs[0], "vs": "web", "weight": 3})
            assert status == 200 and answer["servers"][0]["weight"] == 3
            got = await spread(40)
            assert abs(got["b0"] - 30) <= 2 and abs(got["b1"] - 10) <= 2, got
            await r.api("POST", "/api/servers", {"address": addrs[0], "weight": 0})
            assert await spread(6) == {"b1": 6}
            # Bad input: 4xx naming what is wrong, nothing changed.
            status, err = await r.api("POST", "/api/servers", {"address": addrs[0],
                                                               "weight": -1})
            assert status == 400 and err["field"] == "weight"
            status, err = await r.api("POST", "/api/servers", {"address": "127.0.0.1:1",
                                                               "state": "drain"})
            assert status == 404 and "no real server 127.0.0.1:1" in err["error"]
            status, err = await r.api("POST", "/api/servers", {"address": addrs[0],
                                                               "state": "paused"})
            assert status == 400 and err["field"] == "state"


async def test_overrides_survive_a_reload_and_a_restart_until_the_file_changes_the_server(
        tmp_path: Path) -> None:
    async with backends(2) as bk:
        addrs = [bk.address(0), bk.address(1)]
        admin, web = free_port(), free_port()
        text = _two(web, admin, addrs)
        async with running(tmp_path, text, admin_port=admin) as r:
            await r.api("POST", "/api/servers", {"address": addrs[0], "state": "disabled"})
            # A reload that leaves that server alone: still disabled.
            r.path.write_text(text.replace("drain_timeout = 5", "drain_timeout = 6"))
            status, rep = await r.api("POST", "/api/reload")
            assert status == 200 and rep["changed"] is True
            assert {(await r.get("web"))[1] for _ in range(4)} == {"b1"}
        # A restart on the same state directory: still disabled.
        async with running(tmp_path, text, admin_port=admin) as r:
            _, listing = await r.api("GET", "/api/servers")
            assert [s["state"] for s in listing["servers"]] == ["disabled", "enabled"]
            assert {(await r.get("web"))[1] for _ in range(4)} == {"b1"}
            # The file changes that server's weight: the file wins, the override goes.
            r.path.write_text(text.replace(f'"{addrs[0]}", weight = 1',
                                           f'"{addrs[0]}", weight = 2'))
            status, rep = await r.api("POST", "/api/reload")
            assert status == 200
            assert rep["diff"]["real_servers"]["changed"] == [f"web {addrs[0]}"]
            _, listing = await r.api("GET", "/api/servers")
            assert [(s["state"], s["weight"], s["override"]) for s in listing["servers"]] == [
                ("enabled", 2, None), ("enabled", 1, None)]
            assert {(await r.get("web"))[1] for _ in range(6)} == {"b0", "b1"}


def test_a_new_weight_reranks_a_hash_scheduled_pool() -> None:
    servers = (RealServer(Address("10.0.0.1", 80), 1), RealServer(Address("10.0.0.2", 80), 1))
    bal = Balancer(servers, Scheduler.URL_HASH)
    urls = [f"/page/{i}" for i in range(400)]

    def share() -> int:
        picks = [bal.pick("", u) for u in urls]
        for b in picks:
            assert b is not None
            bal.release(b)
        return sum(1 for b in picks if b is bal.backends[0])

    even = share()
    assert 120 < even < 280
    bal.administer(servers, {"10.0.0.1:80": ("enabled", 50)})
    assert share() > 360  # ~98% once 10.0.0.1 weighs 50 times as much
    bal.administer(servers, {})
    assert share() == even  # the config's weights: the very same slots again
