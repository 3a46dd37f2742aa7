"""Where access log lines go: the `lbproxy.access` logger, to stderr or a buffered file, and the
reopening of that file on SIGUSR1 (logrotate's convention: rename the file, then signal).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import IO

from .config.model import AccessLogSettings

ACCESS_LOGGER = "lbproxy.access"
# Lines are written through a 64 KiB buffer and flushed at least this often (like nginx's
# `access_log ... buffer=64k flush=1s`), so a busy proxy does not pay a write(2) per request.
FLUSH_INTERVAL = 1.0
BUFFER_SIZE = 64 * 1024


class BufferedFileHandler(logging.Handler):
    """Appends formatted records to a file through a large buffer, flushed on a timer."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._file: IO[bytes] = open(path, "ab", buffering=BUFFER_SIZE)
        self._timer: asyncio.TimerHandle | None = None
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._file.write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)
            return
        self._flush_later()

    def write_batch(self, data: bytes) -> None:
        """Append already formatted lines, each ending with a newline: the data plane's batches,
        written without a LogRecord (`lbproxy.proxy.accesslog.AccessLog.flush`)."""
        try:
            self._file.write(data)
        except Exception:
            logging.getLogger(__name__).exception("cannot write access log %s", self.path)
            return
        self._flush_later()

    def _flush_later(self) -> None:
        """Flush within FLUSH_INTERVAL (at once when no event loop runs)."""
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._file.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL, self._flush_now)

    def _flush_now(self) -> None:
        self._timer = None
        try:
            self._file.flush()
        except OSError:
            logging.getLogger(__name__).exception("cannot flush access log %s", self.path)

    def reopen(self) -> None:
        """Write what is buffered to the file open now, then open `path` afresh (after a
        rename, a new file): every line goes whole to one file or the other. If the path
        cannot be opened, lines keep going to the file open now (the error is logged)."""
        try:
            new = open(self.path, "ab", buffering=BUFFER_SIZE)
        except OSError as e:
            logging.getLogger(__name__).error("cannot reopen access log %s: %s; still writing "
                                              "to the file open before", self.path, e)
            return
        old, self._file = self._file, new
        try:
            old.close()  # flushes what it holds first
        except OSError:
            logging.getLogger(__name__).exception("cannot flush access log %s", self.path)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._file.closed:
            self._file.flush()
            self._file.close()
        super().close()


def access_log_path(settings: AccessLogSettings, base: Path) -> Path | None:
    """The file the access log goes to, None for stderr. `path` "-" is stderr; unset (""), the
    file access.log in the first directory of $LOGS_DIRECTORY (set by systemd for a unit with
    LogsDirectory=; as nginx writes a file by default: journald rate-limits each service,
    RateLimitBurst=10000 per RateLimitIntervalSec=30s by default, and would drop the lines of a
    busy proxy), else stderr;
    a relative path is relative to `base` (the config file's directory)."""
    if settings.path == "-":
        return None
    if not settings.path:
        logs = os.environ.get("LOGS_DIRECTORY", "").split(":")[0]
        return Path(logs) / "access.log" if logs else None
    path = Path(settings.path)
    return path if path.is_absolute() else base / path


def configure_access_log(settings: AccessLogSettings, base: Path) -> None:
    """(Re)configure the access logger for a config generation."""
    logger = logging.getLogger(ACCESS_LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if not settings.enabled:
        logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False
        return
    logger.setLevel(logging.INFO)
    path = access_log_path(settings, base)
    if path is not None:
        logger.addHandler(BufferedFileHandler(path))
        logger.propagate = False
    else:
        # The data plane batches lines (one record per loop iteration, each line carrying its
        # own timestamp), so the message is written as it is, without a logging prefix.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def reopen_access_log() -> int:
    """Reopen the access-log file (SIGUSR1, after logrotate renamed it): lines not yet written
    go to the old file, later ones to a new file at the configured path. Returns the number of
    files reopened (0 when the log goes to stderr or is off)."""
    n = 0
    for h in logging.getLogger(ACCESS_LOGGER).handlers:
        if isinstance(h, BufferedFileHandler):
            h.reopen()
            n += 1
    return n
