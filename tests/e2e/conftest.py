"""Fixtures of the Let's Encrypt end-to-end tests: one Pebble per module (with DNS records for
the second and third loopback addresses), a bootstrap certificate, a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.e2e.le_node import add_a_record, start_upstream
from tests.support.pebble import PebbleInstance, pebble_or_skip, start_pebble
from tests.support.tlsclient import bootstrap_certificate


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble")) as p:
        add_a_record(p, "shop.le.test", "127.0.0.2")
        add_a_record(p, "r.le.test", "127.0.0.3")
        yield p


boot = pytest.fixture(scope="module")(bootstrap_certificate)


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    runner, port = await start_upstream("hello from the real server")
    yield port
    await runner.cleanup()
