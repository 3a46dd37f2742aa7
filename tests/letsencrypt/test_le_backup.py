"""The encrypted backup file: round trip, wrong passphrase, tampering, hostile headers."""

from __future__ import annotations

import json

import pytest

from lbproxy.letsencrypt.backup import BackupContents, BackupError, seal, unseal

FAST_N = 1 << 10  # tests use a cheap scrypt cost; the default is checked once below

CONTENTS = BackupContents(
    settings={"directory_url": "https://ca.test/dir", "renew_period_days": 20},
    account={"key_pem": "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----",
             "url": "https://ca.test/acct/1"},
    vs_config="[[vs]]\nname = 'web'\n",
    certificates=[{"id": "www", "chain_pem": "x"}],
    created="2026-01-01T00:00:00Z",
)


def test_round_trip_and_the_key_is_not_in_clear() -> None:
    data = seal(CONTENTS, "correct horse", scrypt_n=FAST_N)
    assert b"SECRETKEYBYTES" not in data and b"ca.test" not in data
    assert unseal(data, "correct horse") == CONTENTS


def test_default_cost_round_trip() -> None:
    small = BackupContents(settings={}, account=None)
    assert unseal(seal(small, "passphrase!"), "passphrase!") == small


def test_wrong_passphrase_tamper_and_garbage() -> None:
    data = seal(CONTENTS, "correct horse", scrypt_n=FAST_N)
    with pytest.raises(BackupError, match="wrong passphrase"):
        unseal(data, "wrong horse!")
    outer = json.loads(data)
    outer["n"] = FAST_N * 2  # the header is authenticated
    with pytest.raises(BackupError):
        unseal(json.dumps(outer).encode(), "correct horse")
    outer = json.loads(data)
    outer["n"] = 1 << 30
    with pytest.raises(BackupError, match="out of range"):
        unseal(json.dumps(outer).encode(), "correct horse")
    with pytest.raises(BackupError, match="not an lbproxy"):
        unseal(b"hello", "correct horse")
    with pytest.raises(BackupError, match="at least"):
        seal(CONTENTS, "short")
