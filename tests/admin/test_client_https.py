"""The CLI's client finds the admin API's scheme from the state directory and verifies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme

from lbproxy.admin.client import ClientError, connect


def _setup(tmp_path: Path, admin_ids: list[str]) -> Path:
    cfg = tmp_path / "lb.toml"
    cfg.write_text('state_dir = "st"\n[admin]\nlisten = "127.0.0.1:9555"\n')
    (tmp_path / "st" / "certs").mkdir(parents=True)
    (tmp_path / "st" / "admin.token").write_text("tok\n")
    (tmp_path / "st" / "certs" / ".assignments.json").write_text(
        json.dumps({"vs": {}, "admin": admin_ids}))
    return cfg


def test_plain_http_without_admin_certificate(tmp_path: Path) -> None:
    client = connect(str(_setup(tmp_path, [])))
    assert client.base_url == "http://127.0.0.1:9555"
    assert client.token == "tok"


def test_https_when_a_certificate_is_assigned_to_admin(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = connect(str(_setup(tmp_path, ["adm"])), cacert=str(ca_file))
    assert client.base_url == "https://127.0.0.1:9555"
    assert client.ssl_context is not None
    assert client.ssl_context.verify_mode.name == "CERT_REQUIRED"
    assert client.ssl_context.check_hostname


def test_bad_cacert_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello")
    with pytest.raises(ClientError, match=r"--cacert .*not-a-ca\.pem"):
        connect(str(_setup(tmp_path, ["adm"])), cacert=str(bad))
