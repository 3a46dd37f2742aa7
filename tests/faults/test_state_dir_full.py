"""A full or read-only state directory: importing or renewing a certificate fails with an error
naming the file and the cause; the files stored before stay byte-for-byte intact and are still
served. The state directory is a 256 KiB tmpfs (filled up, then remounted read-only): running as
root, chmod would not stop a write. Skipped where mount is not permitted."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from lbproxy.errors import StoreError
from lbproxy.letsencrypt import Template
from lbproxy.letsencrypt.codes import LeError
from tests.certs.helpers import handshake, issue, tree_digest
from tests.e2e.le_node import Node, https_vs_table, start_node, web_config
from tests.letsencrypt.le_fakes import FakeCA, FakeClock
from tests.support.pebble import free_port


def _mount(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mount", *args], capture_output=True, timeout=10, check=False)


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "n" / "state"
    state.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (as non-root, chmod 0500 would do)")
    r = _mount("-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(state))
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.decode().strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=10,
                       check=False)


@pytest.fixture
async def node(small_state: Path) -> AsyncIterator[tuple[Node, FakeCA, int]]:
    ca = FakeCA(FakeClock(dt.datetime.now(dt.UTC)))
    port = free_port()
    n = await start_node(small_state.parent,
                         web_config(https_vs_table("secure", port, ("site", "plain"), "plain")),
                         client_factory=ca.factory)
    yield n, ca, port
    await n.stop()


def _fill(fs: Path) -> None:
    """Use up every free block of the filesystem holding `fs`."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(1 << 16):  # 256 MiB at most: far beyond the tmpfs size
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    st = os.statvfs(fs)
    assert st.f_bavail == 0


async def test_full_or_read_only_state_dir(node: tuple[Node, FakeCA, int],
                                           small_state: Path) -> None:
    n, ca, port = node
    m = n.manager
    await m.register("ops@example.test")
    await m.request("site", Template("www.le.test", "web"))
    tls_ca = trustme.CA()
    chain, key = issue(tls_ca, "plain.test")
    n.store.import_pem("plain", chain, key)
    n.tls.refresh()
    site, plain = n.store.require("site"), n.store.require("plain")
    assert await handshake(port, "www.le.test") == site.serial
    new_chain, new_key = issue(tls_ca, "plain.test")

    for how in ("full", "read-only"):
        if how == "full":
            _fill(small_state)
        else:
            (small_state / "filler").unlink()
            r = _mount("-o", "remount,ro", str(small_state))
            assert r.returncode == 0, r.stderr
        cause = "No space left on device" if how == "full" else "Read-only file system"
        before = tree_digest(small_state / "certs")
        le_before = tree_digest(small_state / "letsencrypt")
        # an import (admin API: the clear error is its answer)
        st, ans = await n.api("PUT", "/api/certs/plain", {"cert": new_chain.decode(),
                                                          "key": new_key.decode()})
        assert st in (500, 507), ans
        assert cause in ans["error"] and str(small_state / "certs" / "plain") in ans["error"]
        with pytest.raises(StoreError) as exc:
            n.store.import_pem("other", new_chain, new_key)
        assert cause in str(exc.value) and str(small_state / "certs") in str(exc.value)
        # a renewal: the order succeeds at the CA, storing it fails with a clear error
        with pytest.raises(LeError) as le:
            await m.renew("site")
        # (the first write of a renewal is the challenge journal: it names that file)
        assert cause in le.value.text and str(small_state) in le.value.text, le.value.text
        assert le.value.code == 21 if how == "full" else le.value.code in (15, 21)
        assert m.view("site")["last_error"] == le.value.text
        assert m.view("site")["status"] == "backoff"
        # byte-for-byte intact, still served
        assert tree_digest(small_state / "certs") == before
        if how == "read-only":
            assert tree_digest(small_state / "letsencrypt") == le_before
        assert n.store.require("site") == site and n.store.require("plain") == plain
        assert await handshake(port, "www.le.test") == site.serial
        assert await handshake(port, "plain.test") == plain.serial
    # Full: the order starts and fails at its first write. Read-only: the certificate's lock
    # (taken before any order) cannot be written, so no order burns a rate limit (code 15).
    assert len(ca.orders) == 2
