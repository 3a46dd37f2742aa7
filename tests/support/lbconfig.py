"""Pieces of lbproxy config text the end-to-end tests share: the top every test node has (state
directory, admin API, no access log, the Let's Encrypt section ordering from a test Pebble) and
an HTTPS VS that serves only certificates (its one SubVS has no real server), and the VSs the
LoadMaster walk-throughs use (`app_vs`, `rest_vs`)."""

from __future__ import annotations

from collections.abc import Sequence

from tests.support.pebble import PebbleInstance


def config_head(*, admin_port: int = 1, pebble: PebbleInstance | None = None, top: str = "",
                letsencrypt: str = "") -> str:
    """state_dir "state", the admin API on 127.0.0.1:`admin_port` (1: a port never reached),
    no access log, `top` (more top-level keys); with `pebble`, a [letsencrypt] section ordering
    from it, ending with the `letsencrypt` lines."""
    text = f"""
state_dir = "state"
{top}[admin]
listen = "127.0.0.1:{admin_port}"
[access_log]
enabled = false
"""
    if pebble is not None:
        text += f"""[letsencrypt]
directory_url = "{pebble.directory_url}"
ca_bundle = "{pebble.ca_bundle}"
{letsencrypt}"""
    return text


def https_vs(name: str, listen: str, certificates: Sequence[str], *, default: str = "boot",
             more: str = "") -> str:
    """An HTTPS VS on `listen` serving `certificates` (`default` when no SNI matches); its one
    SubVS "rest" takes every request and, having no real server, answers 404 "nothing here".
    `more`: more lines of the VS (before its TLS settings)."""
    certs = ", ".join(f'"{c}"' for c in certificates)
    return f"""
[[vs]]
name = "{name}"
listen = "{listen}"
protocol = "https"
{more}tls = {{ certificates = [{certs}], default_certificate = "{default}" }}
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  not_available = {{ status = 404, body = "nothing here" }}
"""


def app_vs(name: str, listen: str, upstream: int, *, more: str = "") -> str:
    """A VS on `listen` whose one SubVS "app" relays every request to 127.0.0.1:`upstream`
    (no health checks); `more`: more lines of the VS (protocol, tls) before its SubVS."""
    return f"""
[[vs]]
name = "{name}"
listen = "{listen}"
{more}  [[vs.subvs]]
  name = "app"
  rules = ["default"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "127.0.0.1:{upstream}" }} ]
"""


def rest_vs(name: str, listen: str) -> str:
    """A VS on `listen` whose one SubVS "rest" takes every request and, having no real server,
    answers 404 "nothing here" (eligible for HTTP-01 challenges)."""
    return f"""
[[vs]]
name = "{name}"
listen = "{listen}"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  not_available = {{ status = 404, body = "nothing here" }}
"""
