"""Fixtures of the fault tests: the end-to-end ones (a Pebble per module, a bootstrap
certificate, a real server) plus a small helper to read a test's own loopback answers."""

from __future__ import annotations

from tests.e2e.conftest import boot, pebble, upstream

__all__ = ["boot", "pebble", "upstream"]
