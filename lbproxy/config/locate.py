"""Where a config problem is in the TOML source: its line, and its table path with names.

tomllib keeps no positions, so `line_map` scans the text itself (after tomllib accepted it) and
maps every table path the loader names problems by (`vs[1].subvs[0].rules[1]`, `admin.listen`)
to the 1-based line it starts on: `[table]` and `[[array]]` headers (arrays of tables counted in
order, per parent), `key = value` lines (dotted keys too), the keys of inline tables and the
elements of arrays, across lines. `locate` then gives each problem its line (the key's, else the
nearest enclosing table's), the file, and a label naming the VS, SubVS, rule or certificate it is
in: `vs "web" (vs[1]).subvs "api" (subvs[0]).rules[1]`. Best effort: never raises; a path it
cannot place has no line.
"""

from __future__ import annotations

import bisect
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..errors import ConfigProblem

# The key an element of these arrays of tables is known by, as an operator would name it.
_NAMED_BY = {"vs": "name", "subvs": "name", "rule": "name", "certificate": "id"}

_SPACE = re.compile(r"(?:[ \t\r\n]|#[^\n]*)*")
_INLINE_SPACE = re.compile(r"[ \t]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_LITERAL = re.compile(r"'[^'\n]*'")
_ML_BASIC = re.compile(r'"""(?:[^\\]|\\.)*?"""', re.DOTALL)
_ML_LITERAL = re.compile(r"'''.*?'''", re.DOTALL)
_SCALAR = re.compile(r"[^,\]}\n#]+")
_SEGMENT = re.compile(r"\[(\d+)\]|([^.\[\]]+)")
_SYNTAX_LINE = re.compile(r"\bat line (\d+)")


class _Scan:
    """One pass over valid TOML text, recording path -> line."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[str, int] = {}
        self.arrays: dict[str, int] = {}  # array-of-tables path -> tables seen so far

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def note(self, path: str, pos: int) -> None:
        self.lines.setdefault(path, self.line(pos))

    def run(self) -> None:
        table = ""
        while True:
            self.i = _skip(_SPACE, self.s, self.i)
            if self.i >= len(self.s):
                return
            start = self.i
            if self.s.startswith("[[", start):
                self.i += 2
                keys = self.keys()
                table = self.resolve(keys[:-1])
                array = _join(table, keys[-1])
                n = self.arrays.get(array, 0)
                self.arrays[array] = n + 1
                table = f"{array}[{n}]"
                self.note(array, start)
                self.note(table, start)
                self.expect("]]")
            elif self.s.startswith("[", start):
                self.i += 1
                table = self.resolve(self.keys())
                self.note(table, start)
                self.expect("]")
            else:
                self.pair(table)
            if self.i == start:  # no progress: not TOML this scanner understands
                return

    def resolve(self, keys: list[str]) -> str:
        """A header's keys -> the concrete path (an array of tables -> its last table)."""
        path = ""
        for k in keys:
            path = _join(path, k)
            if path in self.arrays:
                path = f"{path}[{self.arrays[path] - 1}]"
        return path

    def expect(self, token: str) -> None:
        self.i = _skip(_INLINE_SPACE, self.s, self.i)
        if self.s.startswith(token, self.i):
            self.i += len(token)

    def keys(self) -> list[str]:
        """A dotted key: bare or quoted parts, separated by dots and optional blanks."""
        out = []
        while True:
            self.i = _skip(_INLINE_SPACE, self.s, self.i)
            m = (_BARE_KEY.match(self.s, self.i) or _BASIC.match(self.s, self.i)
                 or _LITERAL.match(self.s, self.i))
            if m is None:
                raise ValueError(f"no key at offset {self.i}")
            text = m.group()
            out.append(text if text[0] not in "\"'" else tomllib.loads(f"k = {text}")["k"])
            self.i = _skip(_INLINE_SPACE, self.s, m.end())
            if not self.s.startswith(".", self.i):
                return out
            self.i += 1

    def pair(self, table: str) -> None:
        start = self.i
        path = table
        for k in self.keys():
            path = _join(path, k)
            self.note(path, start)
        self.expect("=")
        self.i = _skip(_INLINE_SPACE, self.s, self.i)
        self.value(path)

    def value(self, path: str) -> None:
        s, i = self.s, self.i
        if s.startswith("[", i):
            self.i += 1
            n = 0
            while True:
                self.i = _skip(_SPACE, s, self.i)
                if s.startswith("]", self.i) or self.i >= len(s):
                    self.i += 1
                    return
                if s.startswith(",", self.i):
                    self.i += 1
                    continue
                self.note(f"{path}[{n}]", self.i)
                self.value(f"{path}[{n}]")
                n += 1
        if s.startswith("{", i):
            self.i += 1
            while True:
                self.i = _skip(_SPACE, s, self.i)
                if s.startswith("}", self.i) or self.i >= len(s):
                    self.i += 1
                    return
                if s.startswith(",", self.i):
                    self.i += 1
                    continue
                self.pair(path)
        for pattern in (_ML_BASIC, _ML_LITERAL, _BASIC, _LITERAL, _SCALAR):
            m = pattern.match(s, i)
            if m is not None:
                end = m.end()
                if pattern is _ML_BASIC or pattern is _ML_LITERAL:  # """a""""": up to 2 more
                    while end < len(s) and s[end] == s[i] and end - m.end() < 2:
                        end += 1
                self.i = end
                return
        raise ValueError(f"no value at offset {i}")


def _skip(pattern: re.Pattern[str], s: str, i: int) -> int:
    """Past what `pattern` (blanks, comments) matches at i."""
    m = pattern.match(s, i)
    return m.end() if m else i


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def line_map(text: str) -> dict[str, int]:
    """Table path -> 1-based line, for every path the scan reached (all of valid TOML, or up to
    the first construct it does not understand)."""
    scan = _Scan(text)
    try:
        scan.run()
    except (ValueError, IndexError, RecursionError, tomllib.TOMLDecodeError):
        pass
    return scan.lines


def line_of(path: str, lines: dict[str, int]) -> int | None:
    """The line of `path`, else of the nearest enclosing table or array that has one."""
    while path:
        if path in lines:
            return lines[path]
        m = re.search(r"(\[\d+\]|\.[^.\[\]]*)$", path)
        if m is None:
            return None
        path = path[:m.start()]
    return None


def label_of(path: str, data: Any) -> str:
    """`path` with names: vs[1].listen -> vs "web" (vs[1]).listen; "" when nothing is named."""
    parts: list[str] = []
    named = False
    node, key = data, ""
    for index, name in _SEGMENT.findall(path):
        if name:
            key = name
            parts.append(name)
            node = node.get(name) if isinstance(node, dict) else None
            continue
        node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        if not parts:
            return ""
        parts[-1] += f"[{index}]"
        field = _NAMED_BY.get(key)
        title = node.get(field) if field and isinstance(node, dict) else None
        if isinstance(title, str) and title:
            parts[-1] = f"{key} {json.dumps(title[:64])} ({parts[-1]})"
            named = True
    return ".".join(parts) if named else ""


def syntax_line(message: str) -> int | None:
    """The line tomllib names in a syntax error ("... (at line 3, column 10)")."""
    m = _SYNTAX_LINE.search(message)
    return int(m.group(1)) if m else None


def locate(problems: Iterable[ConfigProblem], text: str, *, data: Any = None,
           source: str | None = None) -> list[ConfigProblem]:
    """`problems` with line, source and label filled in from the TOML `text` (`data`: the text
    already parsed, else parsed here). A problem whose path is not in the text keeps no line."""
    problems = list(problems)
    try:
        if data is None:
            data = tomllib.loads(text)
        lines = line_map(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        data, lines = {}, {}
    out = []
    for p in problems:
        if p.where == source or "/" in p.where or p.where.startswith(("<", "vs '")):
            out.append(p)  # a file or a VS by name, not a table path
            continue
        try:
            line, label = line_of(p.where, lines), label_of(p.where, data)
        except (ValueError, IndexError, TypeError, AttributeError):
            line, label = None, ""
        out.append(replace(p, line=p.line if line is None else line,
                           source=p.source or source, label=p.label or label))
    return out


__all__ = ["label_of", "line_map", "line_of", "locate", "syntax_line"]
