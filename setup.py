"""Builds lbproxy with the data plane's hot modules compiled to C by mypyc.

The modules below are plain, `mypy --strict`-typed Python. Compiled, their part of a request
costs about a third less CPU, a relayed request 15 % less in all (docs/architecture.md,
"Compiled hot path"). `LBPROXY_PURE=1` at install time, or a build without mypyc, installs them
as Python only; lbproxy/proxy/compiled.py loads the sources at run time when a compiled module
is older than its source (an edited checkout).
"""

import os

from setuptools import setup

HOT = [f"lbproxy/proxy/{name}.py" for name in (
    "request", "outbox", "clientstate", "answers", "exchange", "reqparse", "client", "alpn",
    "h2conn", "upstream", "resphead", "connpool", "proxyproto", "balancer", "counters", "http",
    "tlssock", "tlsserver", "service", "clock",
)]


def ext_modules() -> list[object]:
    if os.environ.get("LBPROXY_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    # The build environment has none of the run-time dependencies: their types are Any here
    # (compiled code handles their objects as any Python object either way), and errors in the
    # modules the hot ones import are not reported (`mypy --strict` on the checkout checks them).
    flags = ["--ignore-missing-imports", "--follow-imports=silent"]
    return list(mypycify([*flags, *HOT], opt_level="3", group_name="lbproxy_hot"))


setup(ext_modules=ext_modules())
