"""Where access log lines go: the `lbproxy.access` logger, to stderr or a buffered file."""

from __future__ import annotations

import asyncio
import logging
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
    if settings.path:
        path = Path(settings.path)
        if not path.is_absolute():
            path = base / path
        logger.addHandler(BufferedFileHandler(path))
        logger.propagate = False
    else:
        # The data plane batches lines (one record per loop iteration, each line carrying its
        # own timestamp), so the message is written as it is, without a logging prefix.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
