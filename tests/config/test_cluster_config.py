"""The [cluster] table (a Redis shared by several hosts): absent by default, every key read,
relative files resolved next to the config, and every problem reported with its table path."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lbproxy.config import parse_config
from lbproxy.config.model import ClusterSettings
from lbproxy.errors import ConfigError

MINIMAL = """
[cluster]
redis_url = "redis://10.0.0.5:6379/2"
encryption_key_file = "/etc/lbproxy/cluster.key"
"""


def problems(text: str, base: Path | None = None) -> set[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, base=base)
    return {(p.where, p.message) for p in e.value.problems}


def test_absent_by_default() -> None:
    assert parse_config("").cluster is None
    assert parse_config("[events]\n").cluster is None


def test_minimal_table_and_defaults() -> None:
    c = parse_config(MINIMAL).cluster
    assert c == ClusterSettings("redis://10.0.0.5:6379/2", "/etc/lbproxy/cluster.key")
    assert (c.key_prefix, c.node_name, c.password_file, c.tls_ca_file) == ("lbproxy", "", "", "")
    assert (c.lock_lease, c.poll_interval) == (20.0, 30.0)
    assert c.node() == socket.gethostname()


def test_every_key_with_relative_files_resolved_against_the_base(tmp_path: Path) -> None:
    c = parse_config("""
[cluster]
redis_url = "rediss://lb:pw@redis.example.net:6380/0"
encryption_key_file = "keys/cluster.key"
password_file = "redis.pw"
tls_ca_file = "/etc/ssl/redis-ca.pem"
key_prefix = "prod.lb-1"
node_name = "edge-1.dc2"
lock_lease = 30
poll_interval = 5.5
""", base=tmp_path).cluster
    assert c == ClusterSettings(
        redis_url="rediss://lb:pw@redis.example.net:6380/0",
        encryption_key_file=str(tmp_path / "keys" / "cluster.key"),
        password_file=str(tmp_path / "redis.pw"), tls_ca_file="/etc/ssl/redis-ca.pem",
        key_prefix="prod.lb-1", node_name="edge-1.dc2", lock_lease=30.0, poll_interval=5.5)
    assert c.node() == "edge-1.dc2"
    relative_ca = parse_config("""
[cluster]
redis_url = "rediss://redis.example.net"
encryption_key_file = "/k"
tls_ca_file = "ca.pem"
""", base=tmp_path).cluster
    assert relative_ca is not None and relative_ca.tls_ca_file == str(tmp_path / "ca.pem")


def test_other_accepted_urls() -> None:
    for url in ("redis://127.0.0.1", "redis://[::1]:6379", "rediss://h:6380/15",
                "unix:///run/redis/redis.sock", "redis://user:p%40ss@h:1/"):
        c = parse_config(MINIMAL.replace("redis://10.0.0.5:6379/2", url)).cluster
        assert c is not None and c.redis_url == url


def test_required_keys() -> None:
    assert problems("[cluster]\n") == {
        ("cluster.redis_url", "is required"),
        ("cluster.encryption_key_file", "is required"),
    }
    assert problems('[cluster]\nredis_url = "redis://h"\n') == {
        ("cluster.encryption_key_file", "is required")}


_NOT_REDIS = (" not a redis://, rediss:// or unix:// URL (the rest is not repeated: it may "
              "hold a password)")


def test_bad_urls() -> None:
    for url, message in (
        ("http://:pw@redis:6379", "http://...:" + _NOT_REDIS),
        ("redis:/h", "'redis:/h'...:" + _NOT_REDIS),
        ("", "''...:" + _NOT_REDIS),
        ("redis://h:port", "the port must be a number from 0 to 65535"),
        ("redis://:pw@h:70000", "the port must be a number from 0 to 65535"),
        ("redis://h:6379/db1", "the database after the host must be a number, got 'db1'"),
    ):
        got = problems(MINIMAL.replace("redis://10.0.0.5:6379/2", url))
        assert got == {("cluster.redis_url", message)}, url
        if "pw" in url:
            assert all("pw" not in m for _, m in got)  # a password is not repeated


def test_bad_names_and_numbers_all_at_once() -> None:
    got = problems("""
[cluster]
redis_url = "redis://h"
encryption_key_file = "/k"
key_prefix = "prod lb"
node_name = "-edge"
lock_lease = 1
poll_interval = 0
colour = "red"
""")
    assert got == {
        ("cluster.key_prefix", "'prod lb': use 1-63 letters, digits, '.', '_' or '-'"),
        ("cluster.node_name", "'-edge': use 1-63 letters, digits, '.', '_' or '-'"),
        ("cluster.lock_lease", "must be between 2 and 600, got 1"),
        ("cluster.poll_interval", "must be between 1 and 3600, got 0"),
        ("cluster.colour", "unknown key (typo?)"),
    }


@pytest.mark.parametrize(("key", "value", "ok"), [
    ("node_name", "a" * 63, True), ("node_name", "a" * 64, False),
    ("node_name", "edge:1", False), ("node_name", "edge/1", False), ("node_name", "é", False),
    ("key_prefix", "lb.prod_1-x", True), ("key_prefix", "lb:prod", False),
    ("key_prefix", "", False),
    ("key_prefix", ":lb", False), ("key_prefix", "lb*", False), ("key_prefix", "b" * 64, False),
    ("lock_lease", 2, True), ("lock_lease", 600, True), ("lock_lease", 600.5, False),
    ("lock_lease", "20", False),
])
def test_name_and_lease_limits(key: str, value: object, ok: bool) -> None:
    text = MINIMAL + f"{key} = {value!r}\n".replace("'", '"')
    if ok:
        c = parse_config(text).cluster
        assert c is not None
        assert getattr(c, key) == value
    else:
        assert {where for where, _ in problems(text)} == {f"cluster.{key}"}


def test_an_empty_key_file_name() -> None:
    assert problems(MINIMAL.replace('"/etc/lbproxy/cluster.key"', '""')) == {
        ("cluster.encryption_key_file", "must name a file")}


def test_tls_ca_file_needs_rediss() -> None:
    assert problems(MINIMAL + 'tls_ca_file = "/etc/ssl/ca.pem"\n') == {
        ("cluster.tls_ca_file", "applies to rediss:// URLs only")}


def test_wrong_types() -> None:
    got = problems('cluster = "redis://h"\n')
    assert ("cluster", "expected a table, got str") in got
    got = problems("""
[cluster]
redis_url = 6379
encryption_key_file = ["/k"]
password_file = true
""")
    assert got == {
        ("cluster.redis_url", "expected a string, got int"),
        ("cluster.encryption_key_file", "expected a string, got list"),
        ("cluster.password_file", "expected a string, got a boolean"),
    }
