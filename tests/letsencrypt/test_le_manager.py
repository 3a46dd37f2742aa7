"""LEManager on a fake clock with a fake CA: automatic renewal at the window (period and ARI with
`replaces`), visible backoff honouring Retry-After, persistence across restarts, start-up that
never waits on the CA, delete rules."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from acmeclient import RenewalInfo
from acmeclient.errors import RateLimitedError
from acmeclient.messages import Problem
from lbproxy.config.model import Address, Config, SubVS, VirtualService
from lbproxy.errors import StoreError
from lbproxy.letsencrypt import Template
from tests.letsencrypt.le_fakes import ManagerEnv as Env

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CONFIG = Config(virtual_services=(
    VirtualService("web", Address("127.0.0.1", 1), subvs=(SubVS("rest", rules=("default",)),)),))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.start(tmp_path, CONFIG, T0)
    yield e
    await e.manager.stop()


async def test_renews_once_per_window_for_a_year_of_6_day_certificates(env: Env) -> None:
    env.ca.lifetime = dt.timedelta(days=6)
    await env.manager.request("c", Template("a.test", "web", (("b.test", "web"),)))
    assert env.ca.presented[:2] == [("a.test", "tok0" + "x" * 40), ("b.test", "tok1" + "x" * 40)]
    assert env.runtime.current.injections == ()
    serials = [env.store.require("c").serial]
    for _ in range(60 * 24):  # 60 days in 1-hour steps
        await env.step(dt.timedelta(hours=1))
        info = env.store.require("c")
        assert info.not_after > env.clock(), "expired"
        if info.serial != serials[-1]:
            serials.append(info.serial)
    # 6-day certificates with a 30-day period renew at 4 days (1/3 of the lifetime): 15 in 60 days
    assert len(serials) - 1 == len(env.ca.orders) - 1 == 15
    gaps = {(b["at"] - a["at"]) for a, b in zip(env.ca.orders, env.ca.orders[1:], strict=False)}
    assert max(gaps) <= dt.timedelta(days=4) and min(gaps) >= dt.timedelta(days=3, hours=22)
    assert all(o["replaces"] for o in env.ca.orders[1:])
    assert env.manager.view("c")["renewals"] == 15


async def test_ari_window_takes_precedence_and_replaces_is_sent(env: Env) -> None:
    await env.manager.request("c", Template("a.test", "web"))
    env.ca.ari = RenewalInfo(T0 + dt.timedelta(days=10), T0 + dt.timedelta(days=11))
    await env.step(dt.timedelta(days=9))
    assert len(env.ca.orders) == 1
    for _ in range(48):
        await env.step(dt.timedelta(hours=1))
    assert len(env.ca.orders) == 2
    assert T0 + dt.timedelta(days=10) <= env.ca.orders[1]["at"] < T0 + dt.timedelta(days=11)
    assert env.ca.orders[1]["replaces"]


async def test_failure_backs_off_with_retry_after_and_is_visible(env: Env) -> None:
    await env.manager.request("c", Template("a.test", "web"))
    env.ca.fail_with = RateLimitedError(
        Problem("urn:ietf:params:acme:error:rateLimited", "too many"), status=429,
        retry_after=7200.0)
    await env.step(dt.timedelta(days=60, minutes=1))  # in the 30-day window
    assert len(env.ca.orders) == 2
    v = env.manager.view("c")
    assert v["status"] == "backoff" and v["last_code"] == 4 and "too many" in v["last_error"]
    assert dt.datetime.fromisoformat(v["next_attempt"]) == env.clock() + dt.timedelta(hours=2)
    await env.step(dt.timedelta(hours=1))
    assert len(env.ca.orders) == 2  # Retry-After honoured
    env.ca.fail_with = None
    await env.step(dt.timedelta(hours=1, minutes=1))
    assert len(env.ca.orders) == 3 and env.manager.view("c")["status"] == "valid"
    assert "(code: 4)" in env.manager.log.messages_path.read_text()


async def test_restart_keeps_everything_and_never_waits_on_the_ca(env: Env) -> None:
    await env.manager.request("c", Template("a.test", "web", key_type="rsa", key_size=2048))
    serial = env.store.require("c").serial
    blocked = asyncio.Event()

    class Hanging:
        def __getattr__(self, name: str) -> object:
            async def hang(*a: object, **k: object) -> None:
                blocked.set()
                await asyncio.Event().wait()
            return hang

    env.ca.factory = lambda *a: Hanging()  # type: ignore[assignment,method-assign]
    async with asyncio.timeout(5):
        await env.restart()
    assert env.manager.account is not None and env.manager.account.url.endswith("/acct/1")
    assert env.store.require("c").serial == serial
    assert env.manager.view("c")["key_type"] == "rsa"
    assert not blocked.is_set() and len(env.ca.orders) == 1
    for p in (env.state / "letsencrypt" / "account.key", env.state / "letsencrypt"):
        assert p.stat().st_mode & 0o077 == 0


async def test_delete_only_through_le_and_not_while_in_use(env: Env) -> None:
    await env.manager.request("c", Template("a.test", "web"))
    with pytest.raises(StoreError):
        env.store.delete("c")
    env.store.assign("c", "web")
    with pytest.raises(StoreError, match="in use"):
        await env.manager.delete("c")
    env.store.unassign("c", "web")
    await env.manager.delete("c")
    assert env.store.get("c") is None and env.manager.list_view() == []
    assert "certificate deleted: c" in env.manager.log.audit_path.read_text()
    with pytest.raises(StoreError):
        await env.manager.request("dup", Template("a.test", "web"))
        await env.manager.request("dup", Template("a.test", "web"))


async def test_a_first_order_in_progress_shows_as_ordering(env: Env) -> None:
    """Issue 14: the view and status of a certificate whose first order runs said `renewing`."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    original = env.ca.factory

    def factory(*args: object) -> object:
        client = original(*args)  # type: ignore[arg-type]
        obtain = client.obtain_certificate

        async def held(*a: object, **kw: object) -> str:
            entered.set()
            await gate.wait()
            return await obtain(*a, **kw)  # type: ignore[arg-type]
        client.obtain_certificate = held  # type: ignore[method-assign]
        return client

    env.manager.client_factory = factory  # type: ignore[assignment]
    await env.manager.request("c", Template("a.test", "web"), wait=False)
    await entered.wait()
    assert env.manager.view("c")["status"] == "ordering"
    assert [s.state for s in env.manager.cert_statuses() if s.id == "c"] == ["ordering"]
    gate.set()
    await env.manager.wait_idle()
    assert env.manager.view("c")["status"] == "valid"
