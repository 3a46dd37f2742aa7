"""`lbproxy status` text: a down or disabled real server, an unavailable SubVS, a VS that is not
listening and a certificate's last error are all visible."""

from __future__ import annotations

import io

from lbproxy.admin.cli import print_status

STATUS = {
    "pid": 1, "uptime_s": 5.0, "generation": 2, "virtual_services": 2, "injections": 0,
    "certificates": 1, "certificates_expiring": [],
    "services": [
        {"name": "shop", "listen": "0.0.0.0:443", "protocol": "https", "listening": True,
         "connections": 4, "requests": 100, "requests_per_s": 12.25, "real_servers": [],
         "subvs": [{"name": "api", "available": False, "requests": 7, "requests_per_s": None,
                    "real_servers": [
                        {"address": "10.0.0.1:80", "up": False, "enabled": True,
                         "connections": 0, "requests": 7, "requests_per_s": 0.0},
                        {"address": "10.0.0.2:80", "up": True, "enabled": False,
                         "connections": 0, "requests": 0, "requests_per_s": 0.0}]}]},
        {"name": "old", "listen": "0.0.0.0:8080", "protocol": "http", "listening": False,
         "connections": None, "requests": None, "requests_per_s": None, "subvs": [],
         "real_servers": []}],
    "certificate_status": [
        {"id": "shop", "names": ["a.test"], "days_left": 3.25, "state": "backoff",
         "next_renewal": "2026-01-01T10:00:00+00:00",
         "last_error": "validation failed for a.test (code: 13)"}],
}


def test_status_text_shows_problems() -> None:
    out = io.StringIO()
    print_status(STATUS, out)
    lines = out.getvalue().splitlines()
    row: dict[str, str] = {}
    for ln in lines:
        if ln.strip():
            row.setdefault(ln.split()[0], ln)  # the first: services come before certificates
    assert "https://0.0.0.0:443" in row["shop"] and "12.2" in row["shop"]
    assert "NOT AVAILABLE" in row["api"]
    assert "DOWN" in row["10.0.0.1:80"] and "disabled" in row["10.0.0.2:80"]
    assert "NOT LISTENING" in row["old"]
    cert = [ln for ln in lines if ln.startswith("shop ") and "backoff" in ln]
    assert cert and "3.2" in cert[0] and "2026-01-01T10:00" in cert[0]
    assert "(code: 13)" in cert[0]
