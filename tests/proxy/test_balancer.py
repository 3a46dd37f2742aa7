"""The schedulers: who gets picked, in what proportion, and what survives a reload."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.config.model import Address, RealServer, Scheduler
from lbproxy.proxy.balancer import Backend, Balancer

ALL = list(Scheduler)


def servers(*weights: int) -> list[RealServer]:
    return [RealServer(Address(f"10.0.0.{i + 1}", 80), w) for i, w in enumerate(weights)]


def host(b: Backend | None) -> str:
    assert b is not None
    return b.address.host


def picks(bal: Balancer, n: int, *, release: bool = True, src: str = "192.0.2.1",
          url: str = "/") -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        b = bal.pick(src, url)
        out[host(b)] += 1
        if release:
            assert b is not None
            bal.release(b)
    return out


# -- round robin -------------------------------------------------------------------------------

def test_rr_takes_turns_and_ignores_weights() -> None:
    bal = Balancer(servers(5, 1, 1), Scheduler.ROUND_ROBIN)
    seq = [host(bal.pick("", "/")) for _ in range(6)]
    assert seq == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2
    assert picks(bal, 300) == {"10.0.0.1": 100, "10.0.0.2": 100, "10.0.0.3": 100}


def test_rr_skips_a_server_that_goes_down_and_resumes_it() -> None:
    bal = Balancer(servers(1, 1, 1), Scheduler.ROUND_ROBIN)
    bal.backends[1].healthy = False
    assert picks(bal, 100) == {"10.0.0.1": 50, "10.0.0.3": 50}
    bal.backends[1].healthy = True
    assert picks(bal, 99) == {"10.0.0.1": 33, "10.0.0.2": 33, "10.0.0.3": 33}


# -- smooth weighted round robin ---------------------------------------------------------------

def test_wrr_is_smooth_like_nginx() -> None:
    bal = Balancer(servers(5, 1, 1), Scheduler.WEIGHTED_ROUND_ROBIN)
    seq = "".join("abc"[int(host(bal.pick("", "/"))[-1]) - 1] for _ in range(14))
    assert seq == "aabacaa" * 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=3))
def test_wrr_is_exactly_proportional_over_each_cycle(weights: list[int], cycles: int) -> None:
    bal = Balancer(servers(*weights), Scheduler.WEIGHTED_ROUND_ROBIN)
    got = picks(bal, sum(weights) * cycles)
    assert got == {f"10.0.0.{i + 1}": w * cycles for i, w in enumerate(weights)}


def test_wrr_weight_change_at_run_time_takes_effect() -> None:
    bal = Balancer(servers(1, 1), Scheduler.WEIGHTED_ROUND_ROBIN)
    assert picks(bal, 10) == {"10.0.0.1": 5, "10.0.0.2": 5}
    bal.backends[0].weight = 4
    got = picks(bal, 50)
    assert abs(got["10.0.0.1"] - 40) <= 2 and got["10.0.0.1"] + got["10.0.0.2"] == 50


# -- least connections -------------------------------------------------------------------------

def test_lc_picks_the_least_loaded() -> None:
    bal = Balancer(servers(1, 1, 1), Scheduler.LEAST_CONNECTIONS)
    a, b, c = bal.backends
    a.active, b.active, c.active = 5, 2, 7
    chosen = bal.pick("", "/")
    assert chosen is b and b.active == 3
    b.active = 9
    assert bal.pick("", "/") is a


def test_lc_ties_take_turns_and_load_evens_out() -> None:
    bal = Balancer(servers(1, 1, 1), Scheduler.LEAST_CONNECTIONS)
    # Idle pool, one request at a time: equal servers share the load.
    assert picks(bal, 90) == {"10.0.0.1": 30, "10.0.0.2": 30, "10.0.0.3": 30}
    # Held requests: each new one goes where the fewest are in flight.
    picks(bal, 30, release=False)
    assert [b.active for b in bal.backends] == [10, 10, 10]


def test_lc_ignores_weights_except_zero() -> None:
    bal = Balancer(servers(5, 1, 0), Scheduler.LEAST_CONNECTIONS)
    assert picks(bal, 40, release=False) == {"10.0.0.1": 20, "10.0.0.2": 20}


def test_wlc_shares_by_weight_under_load() -> None:
    bal = Balancer(servers(3, 1, 2), Scheduler.WEIGHTED_LEAST_CONNECTIONS)
    picks(bal, 60, release=False)
    assert [b.active for b in bal.backends] == [30, 10, 20]
    # Requests finish in random order and new ones arrive: each goes to the least active/weight
    # server, so the in-flight counts stay at the weights' proportions.
    rnd = random.Random(7)
    in_flight = [b for b in bal.backends for _ in range(b.active)]
    for _ in range(2000):
        bal.release(in_flight.pop(rnd.randrange(len(in_flight))))
        least = min(b.active / b.weight for b in bal.backends)
        b = bal.pick("", "/")
        assert b is not None and (b.active - 1) / b.weight == least
        in_flight.append(b)
        assert all(abs(x.active - 10 * x.weight) <= 1 for x in bal.backends)


def test_wlc_idle_pool_shares_by_weight() -> None:
    bal = Balancer(servers(3, 1), Scheduler.WEIGHTED_LEAST_CONNECTIONS)
    assert picks(bal, 40) == {"10.0.0.1": 30, "10.0.0.2": 10}


# -- hashes ------------------------------------------------------------------------------------

def test_src_hash_is_stable_per_ip_and_spreads_over_ips() -> None:
    bal = Balancer(servers(1, 1, 1, 1), Scheduler.SOURCE_IP_HASH)
    ips = [f"198.51.{i // 256}.{i % 256}" for i in range(4000)]
    first = {ip: host(bal.pick(ip, "/a")) for ip in ips}
    # Same IP, any URL, any time: same server.
    assert all(host(bal.pick(ip, f"/other/{i}")) == first[ip] for i, ip in enumerate(ips[:500]))
    share = Counter(first.values())
    assert len(share) == 4
    # 4000 keys over 4 servers: 1000 each with a standard deviation of 27; allow 5.
    assert all(860 <= n <= 1140 for n in share.values()), share


def test_src_hash_respects_weights() -> None:
    bal = Balancer(servers(3, 1), Scheduler.SOURCE_IP_HASH)
    share = Counter(host(bal.pick(f"2001:db8::{i:x}", "/")) for i in range(4000))
    assert 2860 <= share["10.0.0.1"] <= 3140, share  # 3000, standard deviation 27


def test_url_hash_is_stable_per_path_and_ignores_query_and_client() -> None:
    bal = Balancer(servers(1, 1, 1), Scheduler.URL_HASH)
    urls = [f"/img/{i}.png" for i in range(3000)]
    first = {u: host(bal.pick("192.0.2.1", u)) for u in urls}
    for i, u in enumerate(urls[:300]):
        assert host(bal.pick(f"203.0.113.{i % 250}", f"{u}?v={i}")) == first[u]
    share = Counter(first.values())
    # 1000 each with a standard deviation of 26; allow 5.
    assert all(870 <= n <= 1130 for n in share.values()), share


@pytest.mark.parametrize("scheduler", [Scheduler.SOURCE_IP_HASH, Scheduler.URL_HASH])
def test_hash_moves_only_the_down_servers_share(scheduler: Scheduler) -> None:
    bal = Balancer(servers(1, 1, 1, 1, 1), scheduler)
    keys = [f"/k/{i}" if scheduler is Scheduler.URL_HASH else f"10.1.{i // 256}.{i % 256}"
            for i in range(2000)]

    def assignment() -> dict[str, str]:
        return {k: host(bal.pick(k, k)) for k in keys}

    before = assignment()
    bal.backends[2].enabled = False
    during = assignment()
    moved = {k for k in keys if before[k] != during[k]}
    assert moved == {k for k in keys if before[k] == "10.0.0.3"}
    # The orphaned keys spread over the four others, not onto one neighbour.
    assert len(Counter(during[k] for k in moved)) == 4
    bal.backends[2].enabled = True
    assert assignment() == before
    # Two down at once (keys whose first and second choices are both gone): still only theirs.
    bal.backends[0].healthy = bal.backends[3].healthy = False
    during = assignment()
    assert {k for k in keys if before[k] != during[k]} == {
        k for k in keys if before[k] in ("10.0.0.1", "10.0.0.4")}
    assert set(during.values()) == {"10.0.0.2", "10.0.0.3", "10.0.0.5"}


def test_hash_follows_a_weight_changed_at_run_time() -> None:
    bal = Balancer(servers(1, 1), Scheduler.URL_HASH)
    urls = [f"/u/{i}" for i in range(3000)]
    assert 1300 <= Counter(host(bal.pick("", u)) for u in urls)["10.0.0.1"] <= 1700
    bal.backends[0].weight = 3
    bal.reweighed()
    assert 2100 <= Counter(host(bal.pick("", u)) for u in urls)["10.0.0.1"] <= 2400


def test_url_hash_takes_any_string() -> None:
    bal = Balancer(servers(1, 1), Scheduler.URL_HASH)
    for url in ("/caf\u00e9", "/\udcc3\udca9", "", "?only=query", "/\x00"):
        b = bal.pick("", url)
        assert b is not None and b is bal.pick("", url)


def test_hash_is_the_same_in_every_process() -> None:
    # N workers and N hosts must agree; Python's own hash() is salted per process.
    code = ("from lbproxy.config.model import *; from lbproxy.proxy.balancer import Balancer;"
            "b = Balancer([RealServer(Address('10.0.0.%d' % i, 80)) for i in range(1, 6)],"
            " Scheduler.SOURCE_IP_HASH);"
            "print(' '.join(b.pick('192.0.2.%d' % i, '/').address.host for i in range(40)))")
    outs = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True, timeout=30,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    bal = Balancer(servers(1, 1, 1, 1, 1), Scheduler.SOURCE_IP_HASH)
    here = " ".join(host(bal.pick(f"192.0.2.{i}", "/")) for i in range(40)) + "\n"
    assert outs == {here}


# -- availability, exclusion, accounting -------------------------------------------------------

@pytest.mark.parametrize("scheduler", ALL)
def test_down_disabled_and_weight_zero_get_nothing(scheduler: Scheduler) -> None:
    bal = Balancer([*servers(1, 1, 1, 0), RealServer(Address("10.0.0.9", 80), 2, False)],
                   scheduler)
    bal.backends[0].healthy = False
    got: Counter[str] = Counter()
    for i in range(200):
        b = bal.pick(f"192.0.2.{i}", f"/{i}")
        got[host(b)] += 1
        if i % 2:
            assert b is not None
            bal.release(b)
    assert set(got) == {"10.0.0.2", "10.0.0.3"}
    assert bal.any_available()


@pytest.mark.parametrize("scheduler", ALL)
def test_nothing_available_gives_none(scheduler: Scheduler) -> None:
    bal = Balancer(servers(1, 1), scheduler)
    bal.backends[0].healthy = False
    bal.backends[1].enabled = False
    assert bal.pick("192.0.2.1", "/") is None
    assert not bal.any_available()
    assert all(b.requests == 0 and b.active == 0 for b in bal.backends)
    assert Balancer([], scheduler).pick("192.0.2.1", "/") is None


@pytest.mark.parametrize("scheduler", ALL)
def test_a_pool_of_one_server(scheduler: Scheduler) -> None:
    """A pool of one takes a shortcut past the scheduler: the same answers as the scheduler."""
    bal = Balancer(servers(3), scheduler)
    (only,) = bal.backends
    assert picks(bal, 20, src="192.0.2.7", url="/x") == {"10.0.0.1": 20}
    assert bal.pick("192.0.2.1", "/", exclude=only) is None
    for state in ("healthy", "enabled"):
        setattr(only, state, False)
        assert bal.pick("192.0.2.1", "/") is None and not bal.any_available()
        setattr(only, state, True)
    only.weight = 0
    assert bal.pick("192.0.2.1", "/") is None
    only.weight = 1
    assert bal.pick("192.0.2.1", "/") is only and only.active == 1 and only.requests == 21


@pytest.mark.parametrize("scheduler", ALL)
def test_exclude_is_never_returned(scheduler: Scheduler) -> None:
    bal = Balancer(servers(1, 2, 3), scheduler)
    for i in range(60):
        first = bal.pick(f"192.0.2.{i}", f"/{i}")
        assert first is not None
        retry = bal.pick(f"192.0.2.{i}", f"/{i}", exclude=first)
        assert retry is not None and retry is not first
    bal.backends[0].healthy = bal.backends[1].healthy = False
    only = bal.backends[2]
    assert bal.pick("192.0.2.1", "/", exclude=only) is None


def test_pick_and_release_keep_the_counters(caplog: pytest.LogCaptureFixture) -> None:
    bal = Balancer(servers(1), Scheduler.ROUND_ROBIN)
    b = bal.pick("192.0.2.1", "/")
    assert b is not None and (b.active, b.requests, b.failures) == (1, 1, 0)
    b2 = bal.pick("192.0.2.1", "/")
    assert b2 is b and (b.active, b.requests) == (2, 2)
    bal.release(b)
    bal.release(b, ok=False)
    assert (b.active, b.requests, b.failures) == (0, 2, 1)
    with caplog.at_level(logging.ERROR, "lbproxy.proxy.balancer"):
        bal.release(b)
    assert b.active == 0
    assert "without a matching pick" in caplog.text


def test_backend_available() -> None:
    b = Backend(Address("10.0.0.1", 80), 2)
    assert b.available() and b.healthy and not b.checked
    b.weight = 0
    assert not b.available()
    b.weight, b.enabled = 1, False
    assert not b.available()
    b.enabled, b.healthy = True, False
    assert not b.available()
    assert "down" in repr(b)


# -- hot reload --------------------------------------------------------------------------------

def test_reload_carries_over_state_of_the_same_addresses() -> None:
    old = Balancer(servers(1, 1, 1), Scheduler.LEAST_CONNECTIONS)
    a, b, c = old.backends
    held = old.pick("", "/")
    assert held is a
    b.healthy, b.checked, b.down_reason = False, True, "refused"
    c.requests, c.failures = 41, 3
    new_servers = [RealServer(Address("10.0.0.3", 80), 7, False),
                   RealServer(Address("10.0.0.2", 80), 2),
                   RealServer(Address("10.0.0.1", 80)),
                   RealServer(Address("10.0.0.4", 80))]
    new = Balancer(new_servers, Scheduler.WEIGHTED_ROUND_ROBIN, previous=old)
    c2, b2, a2, d2 = new.backends
    assert (c2.requests, c2.failures, c2.weight, c2.enabled) == (41, 3, 7, False)
    assert (b2.healthy, b2.checked, b2.down_reason, b2.weight) == (False, True, "refused", 2)
    assert a2.active == 1
    assert d2.healthy and d2.requests == 0 and not d2.checked
    # Only the fresh server and a (b down, c disabled) take requests after the reload.
    assert {host(new.pick("", "/")) for _ in range(10)} == {"10.0.0.1", "10.0.0.4"}
    # A request picked under the old generation finishes there; the new one sees it gone.
    old.release(held)
    assert a2.active == 5
    assert new.find(Address("10.0.0.4", 80)) is d2 and new.find(Address("10.9.9.9", 80)) is None


def test_reload_drops_removed_servers() -> None:
    old = Balancer(servers(1, 1), Scheduler.ROUND_ROBIN)
    old.backends[1].requests = 9
    new = Balancer(servers(1), Scheduler.ROUND_ROBIN, previous=old)
    again = Balancer(servers(1, 1), Scheduler.ROUND_ROBIN, previous=new)
    assert len(new.backends) == 1
    assert again.backends[1].requests == 0
