"""The compiled hot path (setup.py, lbproxy/proxy/compiled.py): the test command runs the
compiled modules, a stale build is never used, LBPROXY_PURE=1 runs the sources, and the start
line says which."""

from __future__ import annotations

import asyncio
import importlib.machinery
import os
import subprocess
import sys
from bisect import bisect_left
from pathlib import Path

import pytest

from lbproxy.proxy import compiled
from lbproxy.proxy.compiled import builds, stale
from lbproxy.proxy.counters import LATENCY_BUCKETS, latency_slot
from tests.support.lbconfig import rest_vs
from tests.support.pebble import free_port

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
REPO = Path(__file__).resolve().parents[2]


def test_the_test_run_uses_the_compiled_hot_path() -> None:
    """`pip install -e .` (the README's commands) compiled the hot modules, and they are the ones
    imported: a build that silently failed would leave every other test running the sources."""
    if os.environ.get("LBPROXY_PURE") == "1":
        assert compiled.MODE.startswith(("pure", "source")), compiled.MODE
        return
    assert compiled.MODE == "compiled", compiled.MODE
    found = builds()
    for name in ("client", "reqparse", "exchange", "answers", "clientstate", "upstream",
                 "request", "outbox"):
        module = sys.modules.get(f"lbproxy.proxy.{name}") or __import__(
            f"lbproxy.proxy.{name}", fromlist=["_"])
        assert f"lbproxy.proxy.{name}" in found
        assert module.__file__ is not None and module.__file__.endswith(SUFFIX), module.__file__


def test_a_build_older_than_its_source_is_stale(tmp_path: Path) -> None:
    for name, ext_time, src_time in (("fresh", 200, 100), ("edited", 100, 200)):
        ext, src = tmp_path / f"{name}{SUFFIX}", tmp_path / f"{name}.py"
        ext.write_bytes(b"")
        src.write_text("")
        os.utime(ext, (ext_time, ext_time))
        os.utime(src, (src_time, src_time))
    (tmp_path / f"orphan{SUFFIX}").write_bytes(b"")  # no source: not one of ours
    found = builds(tmp_path)
    assert sorted(found) == ["lbproxy.proxy.edited", "lbproxy.proxy.fresh"]
    assert stale(found) == ["lbproxy.proxy.edited"]
    # An installed copy: pip wrote its files in any order, and nobody edits them in place.
    site = tmp_path / "site-packages" / "lbproxy" / "proxy"
    site.mkdir(parents=True)
    for path in (tmp_path / f"edited{SUFFIX}", tmp_path / "edited.py"):
        (site / path.name).write_bytes(path.read_bytes())
        os.utime(site / path.name, (path.stat().st_mtime,) * 2)
    assert stale(builds(site)) == []


def test_pure_runs_every_hot_module_from_its_source() -> None:
    code = ("import lbproxy.proxy as p, lbproxy.proxy.client as c, lbproxy.proxy.upstream as u;"
            "print(p.MODE); print(c.__file__); print(u.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LBPROXY_PURE": "1"}, cwd=REPO, check=True,
                         timeout=60).stdout.splitlines()
    assert out[0] in ("pure", "source (LBPROXY_PURE=1)"), out
    assert out[1].endswith("client.py") and out[2].endswith("upstream.py"), out


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "LBPROXY_PURE"])
async def test_the_start_line_says_how_the_hot_path_runs(tmp_path: Path, pure: bool) -> None:
    """`lbproxy run` names the hot path's mode when it starts, and warns when it is not the
    compiled one (a build that failed would otherwise cost more CPU unnoticed)."""
    conf = tmp_path / "lbproxy.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n[admin]\nenabled = false\n'
                    + rest_vs("web", f"127.0.0.1:{free_port()}"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pure:
        env["LBPROXY_PURE"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", "run", "-c", str(conf), "--workers", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(60):
            async for raw in proc.stderr:
                said.append(raw.decode(errors="replace"))
                if "lbproxy started" in said[-1]:
                    break
    finally:
        proc.terminate()
        await proc.wait()
    text = "".join(said)
    started = [line for line in said if "lbproxy started" in line]
    assert started, text
    if pure:
        assert "hot path source (LBPROXY_PURE=1)" in started[0], started[0]
        assert "hot modules run as Python (source (LBPROXY_PURE=1))" in text, text
    else:
        assert started[0].rstrip().endswith("hot path compiled"), started[0]
        assert "hot modules run as Python" not in text, text


def test_latency_slot_is_bisect_left_over_the_bounds() -> None:
    """The histogram's slot loop answers what bisect_left did, at and between every bound."""
    probes = [0.0, 1e-9, 1e9, *LATENCY_BUCKETS]
    probes += [b * f for b in LATENCY_BUCKETS for f in (0.999999, 1.000001)]
    for dt in probes:
        assert latency_slot(dt) == bisect_left(LATENCY_BUCKETS, dt), dt
    assert latency_slot(1e9) == len(LATENCY_BUCKETS)  # +Inf
