"""Every Let's Encrypt log line a test in this directory leaves is checked for LoadMaster's shape:
`<RFC 3339 time, +00:00> <host> Acme: <text>`, and a coded line ends in `(code: N)`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbproxy.letsencrypt.codes import AUDIT_LOG_FILE, SYSTEM_MESSAGE_FILE

LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 \S+ Acme: \S.*")
CODE_AT_END = re.compile(r"\(code: \d+\)$")


def shape_problems(path: Path) -> list[str]:
    """The lines of one log file that are not in LoadMaster's shape (empty when all are)."""
    bad = []
    for line in path.read_text().splitlines():
        if LINE.fullmatch(line) is None:
            bad.append(f"{path.name}: not `<time +00:00> <host> Acme: <text>`: {line}")
        elif "(code:" in line and (CODE_AT_END.search(line) is None
                                   or line.count("(code:") != 1 or "sub-code:" in line):
            bad.append(f"{path.name}: a code not at the end as `(code: N)`: {line}")
    return bad


@pytest.fixture(autouse=True)
def loadmaster_line_shape(tmp_path: Path) -> Iterator[None]:
    yield
    bad: list[str] = []
    for name in (SYSTEM_MESSAGE_FILE, AUDIT_LOG_FILE):
        for path in sorted(tmp_path.rglob(name)):
            bad += shape_problems(path)
    assert not bad, "\n".join(bad)
