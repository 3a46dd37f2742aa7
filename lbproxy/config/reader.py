"""The config file's table reader: typed getters that collect every problem with its table path
(`_Reader`), and the small parsers every table shares (addresses, names)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigProblem
from .hints import closest, did_you_mean, table_header, unit_hint
from .locate import label_of
from .model import (
    Address,
    TLSSettings,
)

T = TypeVar("T")
# Validation patterns are used with fullmatch only: `$` also matches before a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MISSING = object()
_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]*")
_DEFAULT_TLS = TLSSettings()
_DEFAULT_REDIRECT = "https://{host}{path}"


class _Reader:
    """Reads one TOML table, recording problems under its path instead of raising."""

    def __init__(self, data: Any, path: str, problems: list[ConfigProblem], base: Path,
                 parent: _Reader | None = None) -> None:
        self.path = path
        self.problems = problems
        self.base = base
        self.parent = parent
        # Unknown keys of this reader and its children: (index in problems, reader, key).
        self.unknown: list[tuple[int, _Reader, str]] = parent.unknown if parent else []
        if not isinstance(data, dict):
            self.error(f"expected a table, got {type(data).__name__}")
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | None = None) -> None:
        where = self.at(key) if key else (self.path or "<top>")
        self.problems.append(ConfigProblem(where, message))

    def _get(self, key: str, default: T, kinds: tuple[type, ...], kind_name: str) -> Any:
        self.used.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) and bool not in kinds:
            self.error(f"expected {kind_name}, got a boolean", key)
            return default
        if not isinstance(value, kinds):
            self.error(f"expected {kind_name}, got {type(value).__name__}"
                       f"{unit_hint(key, value, kinds)}", key)
            return default
        return value

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        if required and key not in self.data:
            self.used.add(key)
            self.error("is required", key)
            return default
        v: str = self._get(key, default, (str,), "a string")
        return v

    def flag(self, key: str, default: bool) -> bool:
        v: bool = self._get(key, default, (bool,), "true or false")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v: int = self._get(key, default, (int,), "an integer")
        if not lo <= v <= hi:
            self.error(f"must be between {lo} and {hi}, got {v}", key)
            return default
        return v

    def count_or_auto(self, key: str, lo: int, hi: int) -> int:
        """An integer in [lo, hi], or "auto" (the default), read as 0 (so lo = 0 means auto)."""
        v = self._get(key, "auto", (int, str), 'an integer or "auto"')
        if isinstance(v, str):
            if v.lower() != "auto":
                self.error(f'expected an integer or "auto", got {v!r}', key)
            return 0
        if not lo <= v <= hi:
            self.error(f"must be between {lo} and {hi} (or \"auto\"), got {v}", key)
            return 0
        return int(v)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(key, default, (int, float), "a number")
        if not lo <= v <= hi:
            self.error(f"must be between {lo} and {hi}, got {v}", key)
            return default
        return float(v)

    def enum(self, key: str, default: Any, enum_type: Callable[[str], T], names: str) -> T:
        raw = self._get(key, None, (str,), "a string")
        if raw is None:
            return default  # type: ignore[no-any-return]
        try:
            return enum_type(raw.lower())
        except ValueError:
            members = getattr(enum_type, "__members__", {})
            # Member names too: "round_robin" -> 'rr'.
            known = {**{n.lower(): m.value for n, m in members.items()},
                     **{m.value: m.value for m in members.values()}}
            close = closest(raw.replace("-", "_"), known)
            hint = f"; did you mean {known[close]!r}? (one of {names})" if close else ""
            self.error(f"unknown value {raw!r}" + (hint or f"; expected one of {names}"), key)
            return default  # type: ignore[no-any-return]

    def str_list(self, key: str) -> tuple[str, ...]:
        raw = self._get(key, [], (list,), "a list of strings")
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.error(f"expected a string, got {type(item).__name__}", f"{key}[{i}]")
            else:
                out.append(item)
        return tuple(out)

    def tables(self, key: str) -> list[_Reader]:
        raw = self._get(key, [], (list,), "an array of tables")
        return [_Reader(item, f"{self.at(key)}[{i}]", self.problems, self.base, self)
                for i, item in enumerate(raw)]

    def table(self, key: str) -> _Reader:
        raw = self._get(key, {}, (dict,), "a table")
        return _Reader(raw, self.at(key), self.problems, self.base, self)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                hint = did_you_mean(key, self.used)
                self.unknown.append((len(self.problems), self, key))
                self.error(f"unknown key{hint}" if hint else "unknown key (typo?)", key)

    def explain_unknown(self) -> None:
        """Once every table is read (on the top-level reader): an unknown key that the parent
        table knows (or nearly: a typo) was most likely written after a [header] that took it,
        TOML's one trap; say so."""
        for index, reader, key in self.unknown:
            parent = reader.parent
            if parent is None or key in reader.used:
                continue
            p = self.problems[index]
            owner = label_of(parent.path, self.data) or parent.path or "the top level"
            trap = (f"a key after a {table_header(reader.path)} header belongs to that table; "
                    "move it above the header")
            if key in parent.used:
                message = f"unknown key here, but a key of {owner}: {trap}"
            elif "did you mean" not in p.message and (hint := did_you_mean(
                    key, parent.used - {reader.path.rpartition(".")[2].split("[")[0]}, 0.8)):
                message = f"unknown key{hint} (a key of {owner}: {trap})"
            else:
                continue
            self.problems[index] = dataclasses.replace(p, message=message)


def _enum_names(enum_type: Any) -> str:
    return ", ".join(repr(m.value) for m in enum_type)


def parse_address(text: str) -> Address:
    """'host:port' or '[v6]:port' -> Address; raises ValueError with a plain message."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port; expected address:port")
    if not host:
        raise ValueError(f"{text!r} has no address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} in {text!r} is not between 1 and 65535")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return Address(host, int(port))


def is_loopback(host: str) -> bool:
    """True for a loopback IP address (127.0.0.0/8, ::1, ::ffff:127.x.y.z) or "localhost"; no
    name is resolved, so every other host name counts as reachable from the network."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _address(r: _Reader, key: str, *, required: bool = True) -> Address | None:
    text = r.text(key, required=required)
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError as e:
        r.error(str(e), key)
        return None


def _name(r: _Reader, what: str) -> str:
    name = r.text("name", required=True)
    if name and not _NAME_RE.fullmatch(name):
        r.error(f"{what} name {name!r} must be 1-64 letters, digits, '.', '_' or '-'", "name")
    return name
