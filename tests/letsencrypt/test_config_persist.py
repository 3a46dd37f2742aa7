"""`vs convert`, `restore --vs` and `le delete` of a declared certificate go into the config file
(then through the reload path), so the next reload keeps them; a file that cannot be written
refuses them before anything changes."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbproxy.app import App
from lbproxy.certs import CertStore, config_usage
from lbproxy.config import load_file
from lbproxy.config.writer import ConfigWriteError
from lbproxy.letsencrypt import LEManager
from lbproxy.runtime import RuntimeStore
from tests.letsencrypt.le_fakes import FakeCA, FakeClock

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
PASS = "a long passphrase"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def legacy_file(port: int) -> str:
    return f"""# operator's file: keep these notes
state_dir = "state"
[admin]
enabled = false
[access_log]
enabled = false   # quiet

# legacy: real servers on the parent
[[vs]]
name = "legacy"
listen = "127.0.0.1:{port}"
  [[vs.real_servers]]
  address = "127.0.0.1:9"   # nothing there; not needed
  [vs.health_check]
  type = "none"

# end of file
"""


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    path = tmp_path / "lbproxy.toml"
    path.write_text(legacy_file(free_port()))
    a = App(path, load_file(path, to_run=True))
    await a.start(watch=False)
    yield a
    await a.stop()


async def test_vs_convert_is_kept_in_the_file_and_survives_a_reload(app: App) -> None:
    before = app.config_path.read_text()
    gen = app.runtime.current.generation
    out = await app.manager.convert_vs("legacy")
    assert out["runtime_only"] is False and out["config_file"] == str(app.config_path)
    # Applied through the reload path: one new generation, the file's.
    assert app.runtime.current.generation == gen + 1 and app.reloads_ok == 1
    assert app.config == load_file(app.config_path, to_run=True)
    text = app.config_path.read_text()
    assert text.startswith(before[:before.index("[[vs]]")])
    assert text.endswith("\n# end of file\n") and "# nothing there; not needed" in text
    assert not await app.poll_config()  # the watcher sees nothing left to apply
    assert await app.reload()
    legacy = app.config.vs_by_name("legacy")
    assert legacy is not None and legacy.real_servers == ()
    assert [s.name for s in legacy.subvs] == ["legacy-rs"]
    assert [str(r.address) for r in legacy.subvs[0].real_servers] == ["127.0.0.1:9"]
    assert [v["name"] for v in app.manager.eligible_vs()] == ["legacy"]


async def test_vs_convert_on_a_read_only_file_changes_nothing(app: App) -> None:
    app.config_path.chmod(0o444)
    before, gen, cfg = app.config_path.read_text(), app.runtime.current.generation, app.config
    with pytest.raises(ConfigWriteError) as err:
        await app.manager.convert_vs("legacy")
    msg = str(err.value)
    assert "read-only" in msg and "[[vs.subvs]]" in msg and 'name = "legacy-rs"' in msg
    assert (app.runtime.current.generation, app.config) == (gen, cfg)
    assert app.config_path.read_text() == before
    assert app.manager.eligible_vs() == []


# -- managers without a composition root: the manager's own reload path --------------------------

@dataclass
class Host:
    path: Path
    clock: FakeClock
    ca: FakeCA
    runtime: RuntimeStore
    store: CertStore
    manager: LEManager

    async def reload(self) -> None:
        """What App.reload does with the file, for a manager wired by hand."""
        cfg = load_file(self.path, to_run=True)
        await self.runtime.set_config(cfg)
        await self.manager.sync_config(cfg)

    async def settle(self) -> None:
        await self.manager.run_due()
        await self.manager.wait_idle()


def host_file(root: Path, text: str) -> Path:
    root.mkdir()
    path = root / "lbproxy.toml"
    path.write_text(text)
    return path


async def start_host(root: Path, text: str) -> Host:
    path = host_file(root, text)
    clock = FakeClock(T0)
    ca = FakeCA(clock)
    runtime = RuntimeStore(load_file(path, to_run=True))
    store = CertStore(root / "state", clock=clock,
                      usage=config_usage(lambda: runtime.current.config))
    m = LEManager(root / "state", runtime, store, clock=clock, client_factory=ca.factory,
                  hostname="h", config_path=path)
    await m.start()
    await m.register("ops@example.test")
    return Host(path, clock, ca, runtime, store, m)


DECLARED = """# a host with one declared certificate
state_dir = "state"

[[vs]]
name = "web"
listen = "127.0.0.1:1"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]

# the shop's certificate
[[certificate]]
id = "shop"
common_name = "shop.test"
vs = "web"

# the end
"""


@pytest.fixture
async def declared(tmp_path: Path) -> AsyncIterator[Host]:
    h = await start_host(tmp_path / "h", DECLARED)
    await h.settle()
    assert len(h.ca.orders) == 1 and h.store.get("shop") is not None
    yield h
    await h.manager.stop()


async def test_delete_of_a_declared_certificate_removes_it_from_the_file(declared: Host) -> None:
    h = declared
    await h.manager.delete("shop")
    text = h.path.read_text()
    assert "[[certificate]]" not in text and "# the shop's certificate" not in text
    assert text.endswith("  rules = [\"default\"]\n\n# the end\n")
    assert h.runtime.current.config == load_file(h.path, to_run=True)
    await h.reload()
    h.clock.advance(dt.timedelta(days=1))
    await h.settle()
    assert len(h.ca.orders) == 1, "the reload ordered the deleted certificate again"
    assert h.store.get("shop") is None and "shop" not in h.manager.entries


async def test_delete_of_a_declared_certificate_in_a_read_only_file_is_refused(
        declared: Host) -> None:
    h = declared
    h.path.chmod(0o444)
    with pytest.raises(ConfigWriteError) as err:
        await h.manager.delete("shop")
    assert 'remove the [[certificate]] table with id = "shop"' in str(err.value)
    assert h.path.read_text() == DECLARED
    assert h.store.get("shop") is not None and h.manager.entries["shop"].auto_renew


BACKED_UP = """state_dir = "state"
[letsencrypt]
renew_period_days = 20

[[rule]]
name = "api"
pattern = "/api/"

# from the old machine
[[vs]]
name = "shop"
listen = "127.0.0.1:2"
  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
"""

NEW_HOST = """# the new machine's own settings: keep them
state_dir = "state"
drain_timeout = 7   # short drains here

# placeholder until the restore
[[vs]]
name = "placeholder"
listen = "127.0.0.1:3"
real_servers = [ { address = "127.0.0.1:9" } ]

# access log last
[access_log]
enabled = false
"""


async def test_restore_vs_writes_the_backups_vs_into_the_file(tmp_path: Path) -> None:
    old = await start_host(tmp_path / "old", BACKED_UP)
    data = await old.manager.backup(PASS, include_vs=True)
    await old.manager.stop()
    new = await start_host(tmp_path / "new", NEW_HOST)
    try:
        out = await new.manager.restore(data, PASS, restore_vs=True)
        assert out["vs"] is True
        text = new.path.read_text()
        assert text.startswith(NEW_HOST[:NEW_HOST.index("[[vs]]")])
        # The file's own tables stay where they were; [[rule]], which it lacked, goes last.
        assert "\n# access log last\n[access_log]\nenabled = false\n\n[[rule]]" in text
        assert "# from the old machine" in text and "name = \"placeholder\"" not in text
        assert new.runtime.current.config == load_file(new.path, to_run=True)
        await new.reload()
        cfg = new.runtime.current.config
        assert [v.name for v in cfg.virtual_services] == ["shop"]
        assert [r.name for r in cfg.rules] == ["api"] and cfg.drain_timeout == 7
    finally:
        await new.manager.stop()


async def test_restore_vs_into_a_read_only_file_restores_nothing(tmp_path: Path) -> None:
    old = await start_host(tmp_path / "old", BACKED_UP)
    data = await old.manager.backup(PASS, include_vs=True)
    await old.manager.stop()
    new = await start_host(tmp_path / "new", NEW_HOST)
    try:
        new.path.chmod(0o444)
        gen, account = new.runtime.current.generation, new.manager.account
        with pytest.raises(ConfigWriteError) as err:
            await new.manager.restore(data, PASS, restore_vs=True)
        msg = str(err.value)
        assert "read-only" in msg and 'name = "shop"' in msg and "[[rule]]" in msg
        assert new.path.read_text() == NEW_HOST
        assert new.runtime.current.generation == gen
        assert new.manager.account is account
        assert new.manager.settings.renew_period_days == 30  # the backup's 20 not taken
    finally:
        await new.manager.stop()
