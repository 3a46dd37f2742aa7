"""The reference manual cannot drift: every config key (with its default) is in docs/config.md
and its example parses, every CLI command and option is in docs/cli.md, every log code and event
in docs/log-codes.md, every exported metric in docs/operations.md, the example systemd unit
is accepted by systemd-analyze, and no file of the repository points at notes outside it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import enum
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy import __main__ as main_cli
from lbproxy.config import model as M
from lbproxy.config import parse_config
from lbproxy.config.model import EventSettings
from lbproxy.events import CertStatus, EventKind, Events
from lbproxy.letsencrypt.codes import AcmeCode, VSSubCode
from lbproxy.metrics import MetricsCollector, make_registry
from lbproxy.proxy import DataPlane
from tests.proxy.conftest import NO_CHECK, Client, make_vs, serve, servers, start_upstream

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Every dataclass of the config model, by the section it is documented in.
SECTIONS = ("Config", "VirtualService", "RealServer", "HealthCheck", "NotAvailable",
            "ContentRule", "SubVS", "Timeouts", "Limits", "TLSSettings", "AdminSettings",
            "AccessLogSettings", "LetsEncryptSettings", "CertificateRequest", "EventSettings",
            "ClusterSettings", "RateLimit", "Compression", "HeaderRules", "Hsts",
            "HTTP2Limits", "Rfc2136Settings")
# Fields whose TOML key has another name.
TOML_KEY = {("Config", "virtual_services"): "vs", ("Config", "rules"): "rule",
            ("Config", "certificates"): "certificate", ("ContentRule", "match_type"): "match"}


def _toml(v: Any) -> str | None:
    """A simple default as TOML, or None when it is a table or an array of tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, enum.Enum):
        return json.dumps(v.value)
    if isinstance(v, M.Address):
        return json.dumps(str(v))
    if isinstance(v, bytes):
        return json.dumps(v.decode())
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple) and all(isinstance(x, int | str) for x in v):
        return "[" + ", ".join(str(_toml(x)) for x in v) + "]"
    return None


def _section(text: str, marker: str) -> str:
    """The text from the heading containing `marker` to the next heading of its level."""
    m = re.search(rf"^(#+) .*{re.escape(marker)}.*$", text, re.M)
    assert m, f"no heading with {marker!r}"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def _rows(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([^`]+)`", cells[0]) if len(cells) >= 5 else None
        if m:
            rows[m.group(1)] = cells
    return rows


@pytest.mark.parametrize("cls_name", SECTIONS)
def test_every_config_key_is_documented_with_its_default(cls_name: str) -> None:
    text = (DOCS / "config.md").read_text()
    rows = _rows(_section(text, f"({cls_name})"))
    for f in dataclasses.fields(getattr(M, cls_name)):
        key = TOML_KEY.get((cls_name, f.name), f.name)
        assert key in rows, f"{cls_name}.{f.name} (`{key}`) is missing from docs/config.md"
        _, typ, default, example, meaning = rows[key][:5]
        assert typ and example and meaning, f"{cls_name}.{key}: empty cell"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert default == "required", f"{cls_name}.{key} is required"
        elif f.default is not dataclasses.MISSING and _toml(f.default) is not None:
            assert default.startswith(f"`{_toml(f.default)}`"), (
                f"{cls_name}.{key}: docs say {default}, the model {_toml(f.default)}")
    model_keys = {TOML_KEY.get((cls_name, f.name), f.name)
                  for f in dataclasses.fields(getattr(M, cls_name))}
    assert set(rows) - model_keys == set(), "documented keys that do not exist"


def test_the_example_config_is_valid() -> None:
    text = (DOCS / "config.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    cfg = parse_config(example)
    assert {vs.name for vs in cfg.virtual_services} == {"web80", "shop"}
    assert cfg.events.webhook_url and cfg.certificates[0].sans


def _commands(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, [o for a in p._actions for o in a.option_strings
                       if o.startswith("--") and o != "--help"]
        return
    for name, sp in subs[0].choices.items():
        yield from _commands(sp, (*prefix, name))


ALL_COMMANDS = list(_commands(main_cli._parser()))  # the one parser of every command
COMMON = ("--config", "--admin", "--token-file", "--cacert", "--json")


@pytest.mark.parametrize(("command", "options"), ALL_COMMANDS,
                         ids=[" ".join(c) for c, _ in ALL_COMMANDS])
def test_every_cli_command_and_option_is_documented(command: tuple[str, ...],
                                                    options: list[str]) -> None:
    text = (DOCS / "cli.md").read_text()
    name = "lbproxy " + " ".join(command)
    section = _section(text, f"`{name}`")
    common = _section(text, "Command reference")
    for opt in options:
        where = common if opt in COMMON and command[0] not in ("run", "check") else section
        assert opt in where, f"{opt} of `{name}` is missing from docs/cli.md"
    assert len(section.strip()) > 30, f"`{name}` has no description"


def test_every_log_code_and_event_has_a_cause_and_fix() -> None:
    text = (DOCS / "log-codes.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3:
            rows[cells[0]] = cells
    for code in AcmeCode:
        assert str(code.value) in rows, f"code {code.value} ({code.name}) is not documented"
        assert all(rows[str(code.value)][1:4]), f"code {code.value}: empty cause or fix"
    for sub in VSSubCode:
        assert f"17.{sub.value}" in rows, f"sub-code 17.{sub.value} is not documented"
    for kind in EventKind:
        assert any(kind.value in k for k in rows), f"event {kind.value} is not documented"


def _code_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (DOCS / "log-codes.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"\d+(\.\d+)?", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_an_untrusted_ca_certificate_is_documented_under_code_3_as_it_is_logged() -> None:
    # LoadMaster's 3 is a failure reaching the CA (a TLS handshake the CA's certificate fails is
    # one, on any request); 5 is a directory fetched but not usable. The code gives 3
    # (tests/letsencrypt/test_le_codes_provoked.py provokes it).
    rows = _code_rows()
    assert "not trusted" in rows["3"][2]
    assert "trust" not in rows["5"][2]


# A System Message File / Audit LogFile line, as the docs quote it.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \S+ Acme: .*$", re.M)
LOADMASTER_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 \S+ Acme: \S.*")


def test_log_lines_in_the_docs_have_loadmasters_shape() -> None:
    """Quoted log lines: `+00:00`, never `Z`, a code only at the end as `(code: N)`; what the CLI
    prints ends in the code too, without the HTTP status after it."""
    quoted, bad = 0, []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for m in LOG_LINE.finditer(text):
            line = m.group(0)
            quoted += 1
            if LOADMASTER_LINE.fullmatch(line) is None or ("(code:" in line and (
                    re.search(r"\(code: \d+\)$", line) is None or line.count("(code:") != 1)):
                bad.append(f"{path.name}: {line}")
        for m in re.finditer(r"^.*(?:\(code: \d+\) \(\d{3}\)|sub-code: \d).*$", text, re.M):
            bad.append(f"{path.name}: {m.group(0)}")
    assert quoted >= 20 and not bad, "\n".join(bad)


async def test_every_metric_is_documented() -> None:
    """A real scrape (a data plane that served requests; certificates, events, workers, cluster
    and reloads from sources the way App wires them), parsed by prometheus_client: every family
    in it is in docs/operations.md with its type, and every documented one is in it."""
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    certs = [CertStatus(id="c", names=("a",), managed_by="letsencrypt", serial="1",
                        not_before=when, not_after=when, next_attempt=when, last_success=when,
                        ari_start=when, ari_end=when)]
    events = Events(EventSettings(webhook_url="http://127.0.0.1:9/"))
    up = await start_upstream()
    dp = DataPlane()
    try:
        vs = M.VirtualService(
            name="web", listen=M.Address("127.0.0.1", 0), content_switching=True,
            subvs=(M.SubVS("api", real_servers=servers(up.port), rules=("default",),
                           health_check=NO_CHECK),))
        ports = await serve(dp, vs, make_vs("plain", ports=(up.port,),
                                            rate_limit=M.RateLimit(100, 100),
                                            compression=M.Compression()))
        for port in ports.values():
            c = await asyncio.wait_for(Client.connect(port), 10)
            assert (await asyncio.wait_for(c.request(), 10)).status == 200
            c.close()
        collector = MetricsCollector(
            dp.stats, certs=lambda: certs, acme=lambda: {("order", "success"): 1},
            events=events, reloads=lambda: {"success": 1, "failure": 0},
            workers=lambda: [{"id": 0, "pid": os.getpid(), "generation": 1, "connections": 0,
                              "restarts": 0, "state": "running"}])
        collector.cluster_view = {"connected": True, "nodes": [{"name": "a"}]}
        text = generate_latest(make_registry(collector)).decode()
    finally:
        await dp.shutdown(0.5)
        assert up.runner is not None
        await up.runner.cleanup()
    exported = {(f.name, f.type) for f in text_string_to_metric_families(text)}
    assert len(exported) > 60
    doc = (DOCS / "operations.md").read_text()
    # Counters are documented with their _total sample name, the parser names the family without.
    documented = {re.sub(r"_total$", "", name): kind for name, kind in re.findall(
        r"^\| `((?:lbproxy|process|python)_[a-z_]+)` \| (\w+) \|", doc, re.M)}
    for name, kind in sorted(exported):
        assert documented.get(name) == kind, f"{name} ({kind}) is not in docs/operations.md"
    assert set(documented) <= {n for n, _ in exported}, (
        f"documented metrics that are not exported: {set(documented) - {n for n, _ in exported}}")


def test_the_systemd_unit() -> None:
    unit = (ROOT / "conf" / "lbproxy.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert " run -c " in settings["ExecStart"] and "HUP" in unit
    assert re.search(r"^ExecReload=.* check -c ", unit, re.M)
    assert int(settings["TimeoutStopSec"]) > M.Config().drain_timeout
    assert "CAP_NET_BIND_SERVICE" in settings["AmbientCapabilities"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    lbproxy = Path(sys.executable).parent / "lbproxy"
    tmp = Path(tempfile.mkdtemp())
    try:
        path = tmp / "lbproxy.service"
        path.write_text(unit.replace("/opt/lbproxy/bin/lbproxy", str(lbproxy)))
        ok = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=30)
        assert ok.returncode == 0, ok.stderr
        path.write_text(unit.replace("/opt/lbproxy/bin/lbproxy", "lbproxy-relative"))
        bad = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode != 0  # the check can fail
    finally:
        shutil.rmtree(tmp)


# Paths outside the repository that files once pointed at: a user's clone has none of them.
# Spelled in pieces so that this file does not match itself.
OUTSIDE = tuple(("".join(p)).encode() for p in (
    ("..", "/shared"), ("shared", "/acme-lab"), ("DESIGN", ".md")))


def _repository_files() -> list[Path]:
    """Every file git tracks, plus new ones not ignored (so a file is caught before its commit)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True, timeout=30).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_nothing_points_outside_the_repository() -> None:
    files = _repository_files()
    assert any(f.name == "architecture.md" for f in files), "the file list looks wrong"
    offenders = []
    for path in files:
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            offenders += [f"{path.relative_to(ROOT)}:{lineno}: {needle.decode()}"
                          for needle in OUTSIDE if needle in line]
    where = "\n".join(offenders)
    assert not offenders, f"the repository must stand alone (docs/ holds the design):\n{where}"
