"""The cheap paths the simulated year relies on keep their guarantees: renewalInfo calls stay
bounded with one timer for a run of calls (CallBound), a template's CSR check is made once and
still refuses, the codecs made by hand keep every field, the scheduler's nap ends on wake() and
still stops on stop()."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from lbproxy.errors import AdminError
from lbproxy.letsencrypt import checks
from lbproxy.letsencrypt.challenge import ChallengeJournal
from lbproxy.letsencrypt.issuer import CallBound
from lbproxy.letsencrypt.memstore import MemoryStorage
from lbproxy.letsencrypt.model import Issued, Template
from tests.letsencrypt.le_fakes import ManagerEnv
from tests.letsencrypt.test_le_manager import CONFIG

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
LIMIT = 0.05


async def _hang() -> None:
    await asyncio.Event().wait()


async def _answer(value: int) -> int:
    await asyncio.sleep(0)
    return value


async def test_a_hung_call_times_out_after_many_quick_ones() -> None:
    bound = CallBound(LIMIT)
    assert [await bound.run(_answer(i)) for i in range(1000)] == list(range(1000))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await bound.run(_hang())
    assert LIMIT <= loop.time() - started < LIMIT + 2.0
    # the task is not left cancelled: it goes on, and the bound still holds
    assert await bound.run(_answer(7)) == 7
    with pytest.raises(TimeoutError):
        await bound.run(_hang())
    assert asyncio.current_task().cancelling() == 0   # type: ignore[union-attr]


async def test_quick_calls_share_one_timer() -> None:
    bound = CallBound(30.0)
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)   # type: ignore[attr-defined]
    for i in range(100):
        await bound.run(_answer(i))
    assert len(loop._scheduled) - before <= 1   # type: ignore[attr-defined]
    bound.close()


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    bound = CallBound(30.0)
    task = asyncio.create_task(bound.run(_hang()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await bound.run(_answer(1)) == 1   # usable again


async def test_a_second_task_is_bounded_too() -> None:
    bound = CallBound(LIMIT)
    first = asyncio.create_task(bound.run(_hang()))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await bound.run(_hang())   # while `first` runs: its own asyncio.timeout
    with pytest.raises(TimeoutError):
        await first


def test_a_template_csr_is_checked_once_and_still_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    real = checks.make_csr

    def counting(key: Any, names: list[str], subject: Any) -> bytes:
        calls.append(tuple(names))
        return real(key, names, subject)

    monkeypatch.setattr(checks, "make_csr", counting)
    checks.csr_problem.cache_clear()
    t = Template("Once.example.test", "web")
    for _ in range(3):
        assert checks.csr_problem(t) is None
    assert calls == [("once.example.test",)]
    for bad in (Template("bad.example.test", "web", email="no-at-sign"),
                Template("bad.example.test", "web", country="Germany")):
        for _ in range(2):
            assert checks.csr_problem(bad)


async def test_validate_template_refuses_a_bad_subject_every_time(tmp_path: Path) -> None:
    env = await ManagerEnv.start(tmp_path, CONFIG, T0)
    try:
        bad = Template("bad.example.test", "web", email="no-at-sign")
        for _ in range(2):
            with pytest.raises(AdminError, match="no @"):
                env.manager.validate_template("bad", bad)
    finally:
        await env.manager.stop()


def test_template_json_has_every_field() -> None:
    t = Template("a.test", "web", (("b.test", "w2"),), "rsa", 4096, "DE", "st", "ci", "co",
                 "un", "e@example.test")
    d = dataclasses.asdict(t)
    d["sans"] = [{"name": "b.test", "vs": "w2"}]
    assert t.to_json() == d
    assert Template.from_json(t.to_json()) == t


async def test_issued_and_journal_round_trip() -> None:
    i = Issued(b"-----BEGIN CERTIFICATE-----\nx\n", b"-----BEGIN PRIVATE KEY-----\ny\n")
    assert Issued.from_bytes(i.to_bytes()) == i
    mem = MemoryStorage()
    j = ChallengeJournal(mem)
    await j.add("c1", "web", "s1", host="a.test", token="t1", key_authorization="t1.k")
    await j.add("c2", "web", "s2")
    assert await j.entries() == [
        {"cert": "c1", "vs": "web", "subvs": "s1", "host": "a.test", "token": "t1",
         "key_authorization": "t1.k"},
        {"cert": "c2", "vs": "web", "subvs": "s2"}]
    assert await j.answer("A.test", "t1") == "t1.k"
    await j.remove("web", "s1")
    await j.remove("web", "s2")
    assert await j.entries() == []


async def test_the_scheduler_nap_ends_on_wake_and_stops_on_stop(tmp_path: Path) -> None:
    naps: list[float] = []
    woken = asyncio.Event()

    async def sleep(delay: float) -> None:
        naps.append(delay)
        woken.set()
        await asyncio.Event().wait()   # only wake() or stop() ends it

    env = await ManagerEnv.start(tmp_path, CONFIG, T0)
    await env.manager.stop()
    s = env.manager.scheduler
    s.sleep = sleep
    s.start()
    try:
        for n in (1, 2, 3):
            await asyncio.wait_for(woken.wait(), 5)
            woken.clear()
            assert len(naps) == n
            s.wake()   # the nap ends: the loop looks again and naps again
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await s.stop()
    assert s._task is None and s._napping is None
