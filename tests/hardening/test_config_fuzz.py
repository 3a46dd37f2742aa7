"""Property test of the config loader: any text, and any structured config dumped to TOML, either
parses into a Config or raises ConfigError; nothing else escapes, nothing hangs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.config.loader import parse_config
from lbproxy.config.model import Config
from lbproxy.errors import ConfigError

# Keys the loader reads (and a few it does not), so structured examples reach deep validation.
KEYS = ("name", "listen", "protocol", "kind", "content_switching", "real_servers", "subvs",
        "precedence", "scheduler", "health_check", "not_available", "timeouts", "limits",
        "tls", "redirect_status", "redirect_to", "add_forwarded_headers", "address", "weight",
        "enabled", "rules", "match", "pattern", "on", "header", "negate", "ignore_case",
        "include_host", "include_query", "fail_on_match", "set_flag", "only_if_flag",
        "only_if_not_flag", "type", "path", "host", "expect_status", "interval", "timeout",
        "rise", "fall", "status", "body", "content_type", "head", "idle", "connect",
        "first_byte", "request", "upstream_idle", "max_header_bytes", "max_headers",
        "max_body", "max_connections", "certificates", "default_certificate", "ciphers",
        "unknown")
TOP = ("state_dir", "admin", "access_log", "rule", "vs", "drain_timeout", "letsencrypt",
       "certificate", "events", "bogus")
WORDS = ("http", "https", "proxy", "redirect", "rr", "wrr", "lc", "wlc", "src-hash",
         "url-hash", "prefix", "postfix", "regex", "url", "host", "default", "tcp", "none",
         "127.0.0.1:8080", "[::1]:443", "0.0.0.0:0", "/", "^/a(", "a", "")

scalars = (st.sampled_from(WORDS) | st.text(max_size=12) | st.integers(-2**63, 2**64)
           | st.floats(allow_nan=True) | st.booleans())


def values(depth: int = 3) -> st.SearchStrategy[Any]:
    if depth == 0:
        return scalars
    inner = values(depth - 1)
    return scalars | st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6)


configs = st.dictionaries(st.sampled_from(TOP), values(), max_size=8)


def toml_value(v: Any) -> str:
    """A tiny TOML writer: everything inline (inline tables, arrays)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}"
                           for k, x in v.items()) + "}"


def dump(d: dict[str, Any]) -> str:
    return "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in d.items()) + "\n"


def check(text: str, base: Path) -> None:
    try:
        cfg = parse_config(text, base=base)
    except ConfigError as e:
        assert e.problems, "a ConfigError names at least one problem"
        return
    assert isinstance(cfg, Config)


TOKENS = ("[[vs]]\n", "[[vs.subvs]]\n", "[[rule]]\n", "[admin]\n", "[vs.limits]\n",
          "name = ", "listen = ", '"x"', "'y'", "1", "-1", "1e999", "true", "[", "]", "{", "}",
          "=", ",", "\n", '"""', "\\", "\x00", "\r", "#", ".", "real_servers = ", "rules = ")


def _examples(n: int) -> int:
    """`n` keeps the suite fast; LBPROXY_FUZZ_SCALE=5 (say) runs five times as many."""
    return int(n * float(os.environ.get("LBPROXY_FUZZ_SCALE", "1")))


@settings(max_examples=_examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS) | st.text(max_size=4), max_size=40).map("".join))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    check(text, Path("/nonexistent-lbproxy-base"))


@settings(max_examples=_examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_structured_config_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    check(dump(data), Path("/nonexistent-lbproxy-base"))


def test_the_writer_writes_toml() -> None:
    import tomllib

    d = {"vs": [{"name": "a\x00\u2028", "n": 2**63, "f": float("inf"), "l": [True, {"x": 1}]}]}
    assert tomllib.loads(dump(d))["vs"][0]["l"][1] == {"x": 1}
