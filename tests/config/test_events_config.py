"""The [events] table: defaults, every key read, and every problem reported with its table
path (all of them at once)."""

from __future__ import annotations

import pytest

from lbproxy.config import parse_config
from lbproxy.config.model import EventSettings
from lbproxy.errors import ConfigError


def test_defaults_without_the_table() -> None:
    assert parse_config("").events == EventSettings()
    assert EventSettings().webhook_url == "" and EventSettings().expiry_warning_days == 14


def test_every_key() -> None:
    cfg = parse_config("""
[events]
webhook_url = "https://hooks.example.com/lbproxy"
webhook_timeout = 3
webhook_retries = 2
webhook_backoff = 0.5
webhook_backoff_cap = 30
webhook_queue = 50
expiry_warning_days = 21
check_interval = 600
webhook_headers = { Authorization = "Bearer abc", X-Team = "ops" }
""")
    assert cfg.events == EventSettings(
        webhook_url="https://hooks.example.com/lbproxy", webhook_timeout=3.0, webhook_retries=2,
        webhook_backoff=0.5, webhook_backoff_cap=30.0, webhook_queue=50,
        webhook_headers=(("Authorization", "Bearer abc"), ("X-Team", "ops")),
        expiry_warning_days=21, check_interval=600.0)


def test_every_problem_with_its_path() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("""
[events]
webhook_url = "ftp://x"
webhook_timeout = 0
webhook_retries = -1
webhook_backoff = 10
webhook_backoff_cap = 1
webhook_queue = 0
expiry_warning_days = "soon"
check_interval = 0.5
webhook_headers = { "Bad Header" = "x", Good = 3 }
colour = "red"
""")
    got = {(p.where, p.message.split(",")[0].split(";")[0]) for p in e.value.problems}
    assert got == {
        ("events.webhook_url", "'ftp://x' is not an http(s) URL"),
        ("events.webhook_timeout", "must be between 0.1 and 300"),
        ("events.webhook_retries", "must be between 0 and 100"),
        ("events.webhook_backoff_cap", "must be at least webhook_backoff (10.0)"),
        ("events.webhook_queue", "must be between 1 and 1000000"),
        ("events.expiry_warning_days", "expected an integer"),
        ("events.check_interval", "must be between 1 and 86400"),
        ("events.webhook_headers.Bad Header", "'Bad Header' is not a valid header name"),
        ("events.webhook_headers.Good", "expected a string"),
        ("events.colour", "unknown key (typo?)"),
    }


def test_a_table_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config('events = "on"\n[admin]\nwebhook_url = "x"\n')
    wheres = {p.where for p in e.value.problems}
    assert wheres == {"events", "admin.webhook_url"}
