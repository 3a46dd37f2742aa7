"""CPU-bound work of the feature runs on the manager's low-priority threads, off the loop."""

from __future__ import annotations

import os
import threading

from lbproxy.letsencrypt.blocking import CPU_NICE, CPU_WORKERS, CpuWorkers, on_thread


async def test_cpu_work_runs_on_low_priority_threads_off_the_loop() -> None:
    loop_thread = threading.get_ident()
    cpu = CpuWorkers()
    try:
        seen = [await on_thread(lambda: (threading.get_ident(), threading.current_thread().name,
                                         os.getpriority(os.PRIO_PROCESS,
                                                        threading.get_native_id())), cpu)
                for _ in range(4)]
    finally:
        cpu.close()
    assert all(ident != loop_thread for ident, _, _ in seen)
    assert all(name.startswith("lbproxy-le-cpu") for _, name, _ in seen)
    assert {nice for _, _, nice in seen} == {CPU_NICE}
    assert len({ident for ident, _, _ in seen}) <= CPU_WORKERS


async def test_other_work_keeps_the_process_priority() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    nice = await on_thread(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert nice == own


async def test_cpu_work_yields_the_core_to_the_loop_at_once() -> None:
    """SCHED_IDLE (Linux): the loop, woken, preempts key generation instead of waiting for the
    rest of a nice-19 thread's time slice (bench/README.md, the single-process case)."""
    cpu = CpuWorkers()
    try:
        policy = await on_thread(lambda: os.sched_getscheduler(threading.get_native_id()), cpu)
    finally:
        cpu.close()
    assert policy == os.SCHED_IDLE
    assert await on_thread(lambda: os.sched_getscheduler(threading.get_native_id())) \
        == os.sched_getscheduler(0)
