"""Every error lbproxy raises on purpose, in one tree.

LBProxyError
 +-- ConfigError            a config failed validation; carries every problem
 +-- StoreError             the SSL certificate store refused an operation (see certs/)
 +-- AdminError             an admin API call failed (status hint for the HTTP answer)
"""

from __future__ import annotations

from dataclasses import dataclass


class LBProxyError(Exception):
    """Base of every error lbproxy raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config: where (a table path like vs[0].listen, or file:line) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(LBProxyError):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in problems))


class StoreError(LBProxyError):
    """The certificate store refused an operation; `status` is the HTTP status hint."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class AdminError(LBProxyError):
    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)
