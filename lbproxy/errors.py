"""Every error lbproxy raises on purpose, in one tree.

LBProxyError
 +-- ConfigError            a config failed validation; carries every problem
 +-- CannotListen           a port lbproxy needs at start (admin API, demo server) is unusable
 +-- StoreError             the SSL certificate store refused an operation (see certs/)
 +-- AdminError             an admin API call failed (status hint for the HTTP answer)
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class LBProxyError(Exception):
    """Base of every error lbproxy raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config: where (a table path like vs[0].listen, or a file), what, and, when
    known, the file and line it comes from and the path with names (vs "web" (vs[0]).listen).

    `where` stays the plain table path (tests, the admin API and --json key on it); str() is
    what an operator reads: "lbproxy.toml:12: vs "web" (vs[0]).listen: ...".
    """

    where: str
    message: str
    line: int | None = None
    source: str | None = None  # the file, when the config came from one
    label: str = ""  # `where` with VS/SubVS/rule names; "" when it has none to add

    def __str__(self) -> str:
        loc = self.source or ""
        if self.line is not None:
            loc = f"{loc}:{self.line}" if loc else f"line {self.line}"
        name = self.label or self.where
        if loc and name in ("", self.source):
            return f"{loc}: {self.message}"
        return f"{loc}: {name}: {self.message}" if loc else f"{name}: {self.message}"


class ConfigError(LBProxyError):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class CannotListen(LBProxyError):
    """A socket lbproxy opens at start could not be bound: one line for the operator."""

    def __init__(self, address: str, what: str, reason: str) -> None:
        self.address = address
        self.what = what
        self.reason = reason
        super().__init__(f"cannot listen on {address} ({what}): {reason}")

    @classmethod
    def from_os_error(cls, address: str, what: str, exc: OSError) -> CannotListen:
        # os.strerror: uvloop's strerror repeats the address ("error while attempting to bind...")
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        return cls(address, what, reason[:1].lower() + reason[1:])


class StoreError(LBProxyError):
    """The certificate store refused an operation; `status` is the HTTP status hint."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class AdminError(LBProxyError):
    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)
