"""Sealer (lbproxy.letsencrypt.sealing): values sealed and opened under one key and bound to
their name; another key, another name or a damaged value refused; key file problems named."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from lbproxy.letsencrypt.sealing import KEY_BYTES, Sealer, SealError, new_key

PEM = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n" \
      b"-----END PRIVATE KEY-----\n"


def test_round_trip() -> None:
    s = Sealer(os.urandom(KEY_BYTES))
    for value in (PEM, b"", b"\0" * 100_000):
        sealed = s.seal("lb:v:account.key", value)
        assert value == b"" or value not in sealed
        assert s.open("lb:v:account.key", sealed) == value
    # a fresh nonce every time: the same value never seals the same way twice
    assert s.seal("k", PEM) != s.seal("k", PEM)
    assert b"BEGIN" not in s.seal("k", PEM)


def test_another_key_or_name_cannot_open() -> None:
    s = Sealer(os.urandom(KEY_BYTES), "encryption key file /etc/a.key")
    sealed = s.seal("lb:v:account.key", PEM)
    other = Sealer(os.urandom(KEY_BYTES), "encryption key file /etc/b.key")
    with pytest.raises(SealError, match=r"cannot be decrypted with encryption key file /etc/b\."):
        other.open("lb:v:account.key", sealed)
    with pytest.raises(SealError) as e:
        s.open("lb:v:certs/a.json", sealed)  # moved to another key
    assert str(e.value).startswith("lb:v:certs/a.json:")
    assert isinstance(e.value, ValueError)


def test_a_damaged_value_is_refused() -> None:
    s = Sealer(os.urandom(KEY_BYTES))
    sealed = s.seal("k", PEM)
    for i in (1, 12, 13, len(sealed) // 2, len(sealed) - 1):  # nonce, text and tag
        damaged = bytearray(sealed)
        damaged[i] ^= 0x01
        with pytest.raises(SealError, match="cannot be decrypted"):
            s.open("k", bytes(damaged))
    for bad in (b"", sealed[:20], b"\x02" + sealed[1:], PEM):
        with pytest.raises(SealError, match="k: not a value sealed by lbproxy"):
            s.open("k", bad)
    with pytest.raises(SealError):
        s.open("k", sealed[:-1])  # truncated


def test_new_key_makes_a_usable_key_file(tmp_path: Path) -> None:
    text = new_key()
    assert text.endswith("\n") and len(base64.b64decode(text)) == KEY_BYTES
    assert new_key() != text
    path = tmp_path / "cluster.key"
    path.write_text(text)
    a, b = Sealer.from_file(path), Sealer.from_file(str(path))  # every node reads the same file
    assert b.open("k", a.seal("k", PEM)) == PEM
    assert str(path) in a.where


def test_key_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    cannot_read = re.escape(f"encryption key file {missing}: cannot read it")
    with pytest.raises(SealError, match=cannot_read):
        Sealer.from_file(missing)
    cases = {
        "not-base64.key": ("this is not base64!\n", "not base64"),
        "short.key": (base64.b64encode(os.urandom(16)).decode(), "must be 32 bytes, it has 16"),
        "long.key": (base64.b64encode(os.urandom(48)).decode(), "must be 32 bytes, it has 48"),
        "empty.key": ("", "must be 32 bytes, it has 0"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(SealError) as e:
            Sealer.from_file(path)
        assert str(path) in str(e.value) and why in str(e.value), name
    binary = tmp_path / "binary.key"
    binary.write_bytes(os.urandom(KEY_BYTES) + b"\xff")
    with pytest.raises(SealError, match=re.escape(str(binary))):
        Sealer.from_file(binary)
    with pytest.raises(SealError, match="must be 32 bytes"):
        Sealer(b"short")
