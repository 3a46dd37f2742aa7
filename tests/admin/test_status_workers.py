"""`lbproxy status` text with worker processes: a table of the workers after everything else,
and nothing more in single-process mode (no "workers" key, or an empty list)."""

from __future__ import annotations

import io
from typing import Any

from lbproxy.admin.cli import print_status

BASE: dict[str, Any] = {
    "pid": 100, "uptime_s": 62.0, "generation": 3, "virtual_services": 1, "injections": 0,
    "certificates": 1,
    "services": [
        {"name": "shop", "listen": "0.0.0.0:443", "protocol": "https", "listening": True,
         "connections": 12, "requests": 900, "requests_per_s": 15.0, "subvs": [],
         "real_servers": [{"address": "10.0.0.1:80", "up": True, "enabled": True,
                           "connections": 2, "requests": 900, "requests_per_s": 15.0}]}],
    "certificates_expiring": [{"id": "shop", "expired": False,
                               "not_after": "2026-01-05T00:00:00+00:00"}],
}
WORKERS = [
    {"id": 0, "pid": 1234, "generation": 3, "connections": 12, "restarts": 0,
     "state": "running"},
    {"id": 1, "pid": 98765, "generation": 2, "connections": 0, "restarts": 11,
     "state": "starting"},
]


def text(status: dict[str, Any]) -> str:
    out = io.StringIO()
    print_status(status, out)
    return out.getvalue()


def test_single_process_status_is_unchanged() -> None:
    plain = text(BASE)
    assert "WORKER" not in plain and "1234" not in plain
    assert text({**BASE, "workers": []}) == plain


def test_workers_table_follows_everything_else() -> None:
    plain = text(BASE)
    full = text({**BASE, "workers": WORKERS})
    assert full.startswith(plain)
    lines = full[len(plain):].splitlines()
    assert lines[0] == ""
    head, w0, w1 = lines[1:]
    assert head.split() == ["WORKER", "PID", "GENERATION", "CONNS", "RESTARTS", "STATE"]
    assert w0.split() == ["0", "1234", "3", "12", "0", "running"]
    assert w1.split() == ["1", "98765", "2", "0", "11", "starting"]
    # Aligned: each column starts at the same offset on every row.
    for col in ("PID", "GENERATION", "CONNS", "RESTARTS", "STATE"):
        i = head.index(col)
        assert w0[i] != " " and w1[i] != " " and w0[i - 1] == w1[i - 1] == " "


def test_a_worker_missing_a_field_shows_a_dash() -> None:
    full = text({**BASE, "workers": [{"id": 2, "state": "stopped"}]})
    assert full.splitlines()[-1].split() == ["2", "-", "-", "-", "-", "stopped"]
