"""Fixtures for acmeclient tests: a Pebble per module, a standalone responder on its http port."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # so `tests.support` imports however pytest was invoked
    sys.path.insert(0, _ROOT)

from acmeclient import StandaloneHttp01Responder  # noqa: E402
from tests.support.pebble import PebbleInstance, pebble_or_skip, start_pebble  # noqa: E402


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    """A deterministic Pebble (no nonce rejects, no authz reuse, no VA sleeps)."""
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble")) as instance:
        yield instance


@pytest.fixture
async def responder(pebble: PebbleInstance) -> AsyncIterator[StandaloneHttp01Responder]:
    async with StandaloneHttp01Responder("127.0.0.1", pebble.http_port) as r:
        yield r
