"""The access-log docs against the code: every format and every json key is documented, the
logrotate snippet signals what lbproxy handles, and the latency buckets are the ones claimed."""

from __future__ import annotations

import re
from pathlib import Path

from lbproxy.proxy.accesslog import FORMATS, JSON_FIELDS
from lbproxy.proxy.counters import LATENCY_BUCKETS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _access_log_section() -> str:
    text = (DOCS / "config.md").read_text()
    start = text.index("## `[access_log]` (AccessLogSettings)")
    return text[start:text.index("\n## ", start + 1)]


def test_every_format_and_json_key_is_documented() -> None:
    section = _access_log_section()
    for fmt in FORMATS:
        assert f"- `{fmt}`" in section, fmt
    for key in JSON_FIELDS:
        assert f"`{key}`" in section, key


def test_the_logrotate_snippet_sends_the_signal_lbproxy_reopens_on() -> None:
    text = (DOCS / "operations.md").read_text()
    snippet = re.search(r"```\n(/var/log/lbproxy/access\.log \{.*?\})\n```", text, re.S)
    assert snippet is not None
    post = re.search(r"postrotate\n(.*?)endscript", snippet.group(1), re.S)
    assert post is not None
    assert "--signal=USR1" in post.group(1) and "--kill-whom=main" in post.group(1)
    assert "copytruncate" not in snippet.group(1)
    # What the signal reaches (the reopen itself: tests/workers/test_access_log_reopen.py).
    for module in ("app.py", "workers/worker.py"):
        source = (DOCS.parent / "lbproxy" / module).read_text()
        assert "add_signal_handler(signal.SIGUSR1" in source, module


def test_the_latency_buckets_start_at_100_us() -> None:
    assert LATENCY_BUCKETS[:4] == (0.0001, 0.00025, 0.0005, 0.001)
    assert "buckets from 100 us" in (DOCS / "operations.md").read_text()
