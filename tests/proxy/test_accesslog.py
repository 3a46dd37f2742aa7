"""The access log's batch formatting (sans-I/O: a fake loop and an in-memory logger)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from lbproxy.accesslog import BufferedFileHandler
from lbproxy.proxy.accesslog import MAX_BATCH, AccessLog, line_prefix

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[Any] = []

    def call_soon(self, cb: Any) -> None:
        self.soon.append(cb)

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for cb in soon:
            cb()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def make_log(name: str, handler: logging.Handler) -> tuple[AccessLog, FakeLoop]:
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    loop = FakeLoop()
    return AccessLog(loop, log), loop  # type: ignore[arg-type]


def test_one_record_per_loop_pass_with_every_field() -> None:
    out = Collect()
    alog, loop = make_log("test.access.fields", out)
    prefix = line_prefix("web", "api", "10.0.0.1:80", "127.0.0.1")
    alog.entry(prefix, b"GET", b"/a?x=%d%s", 200, 1234, 10.0, 10.0015)
    alog.entry(prefix, b"PROPFIND", b"/b", 404, 0, 10.0, 10.25)
    assert out.records == []  # nothing before the end of the loop pass
    loop.run_soon()
    (record,) = out.records
    lines = record.split("\n")
    assert re.fullmatch(STAMP + r' web api 10\.0\.0\.1:80 127\.0\.0\.1 "GET /a\?x=%d%s" 200 1234'
                        r' 1\.500', lines[0]), lines[0]
    assert lines[1].endswith(' "PROPFIND /b" 404 0 250.000'), lines[1]
    loop.run_soon()
    assert len(out.records) == 1  # an empty pass writes nothing


def test_bytes_that_are_not_utf8_are_shown_escaped_in_text() -> None:
    out = Collect()
    alog, loop = make_log("test.access.escape", out)
    alog.entry(line_prefix("web", "-", "-", "::1"), b"GET", b"/caf\xe9", 200, 0, 1.0, 1.0)
    loop.run_soon()
    assert out.records[0].endswith('"GET /caf\\xe9" 200 0 0.000')


def test_a_full_batch_is_written_before_the_end_of_the_pass() -> None:
    out = Collect()
    alog, loop = make_log("test.access.batch", out)
    for i in range(MAX_BATCH + 1):
        alog.entry(b'w - - 1.2.3.4 "', b"GET", b"/%d" % i, 200, i, 0.0, 0.0)
    assert len(out.records) == 1 and len(out.records[0].split("\n")) == MAX_BATCH
    loop.run_soon()
    assert out.records[1].endswith('"GET /256" 200 256 0.000')


def test_the_file_gets_the_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    handler = BufferedFileHandler(path)
    try:
        alog, loop = make_log("test.access.file", handler)
        alog.entry(b'w - - 1.2.3.4 "', b"GET", b"/caf\xe9", 200, 3, 0.0, 0.002)
        loop.run_soon()
        handler.flush()
        data = path.read_bytes()
        assert re.fullmatch(STAMP.encode() + rb' w - - 1\.2\.3\.4 "GET /caf\xe9" 200 3 2\.000\n',
                            data), data
    finally:
        handler.close()
