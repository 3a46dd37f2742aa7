"""The certificate store: import (PEM, encrypted PEM, PKCS#12), list, replace, delete, file modes,
persistence across restarts, and every bad input leaving the store byte-for-byte unchanged."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from lbproxy.certs import CertInputError, CertStore, InputProblem
from lbproxy.errors import StoreError
from tests.certs.helpers import issue, serial_of, tree_digest

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def store(tmp_path: Path) -> CertStore:
    return CertStore(tmp_path / "state")


def _encrypt(key_pem: bytes, passphrase: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(passphrase))


def _p12(chain: bytes, key_pem: bytes, passphrase: bytes) -> bytes:
    from cryptography import x509
    certs = x509.load_pem_x509_certificates(chain)
    key = serialization.load_pem_private_key(key_pem, None)
    return pkcs12.serialize_key_and_certificates(
        b"t", key, certs[0], certs[1:] or None,  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(passphrase))


def test_import_list_and_metadata(store: CertStore, ca: trustme.CA) -> None:
    chain, key = issue(ca, "a.example.com", "*.a.example.com")
    res = store.import_pem("site-a", chain, key)
    assert res.warnings == () and not res.replaced
    (info,) = store.list()
    assert info.id == "site-a"
    assert info.names == ("a.example.com", "*.a.example.com")
    assert info.serial == serial_of(chain)
    assert info.key_type == "EC" and info.key_size == 256
    assert "trustme" in info.issuer
    assert info.not_before < NOW < info.not_after
    assert store.users("site-a") == ()
    m = store.material("site-a")
    assert m is not None and m.serial == info.serial and b"PRIVATE KEY" in m.key_pem


def test_files_are_private(store: CertStore, ca: trustme.CA) -> None:
    store.import_pem("a", *issue(ca, "a.example.com"))
    store.import_pem("a", *issue(ca, "a.example.com"), replace=True)
    store.assign("a", "vs1")
    seen = 0
    for p in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
        seen += 1
    assert seen == 6  # certs/, .assignments.json, a/, meta.json, fullchain-2, key-2
    assert stat.S_IMODE(store.root.parent.stat().st_mode) == 0o700


def test_store_survives_restart(tmp_path: Path, ca: trustme.CA) -> None:
    s1 = CertStore(tmp_path / "state")
    chain, key = issue(ca, "a.example.com")
    s1.import_pem("a", chain, key)
    s1.assign("a", "web", default=True)
    s1.assign("a", "admin")
    s2 = CertStore(tmp_path / "state")
    assert s2.list() == s1.list()
    assert s2.material("a") == s1.material("a")
    assert s2.assignment("web").default == "a"
    assert s2.users("a") == ("admin", "web")


def test_replace_keeps_id_and_bumps_generation(store: CertStore, ca: trustme.CA) -> None:
    store.import_pem("a", *issue(ca, "a.example.com"))
    v = store.version
    chain2, key2 = issue(ca, "a.example.com", "www.a.example.com")
    res = store.import_pem("a", chain2, key2, replace=True)
    assert res.replaced and res.info.generation == 2 and res.info.serial == serial_of(chain2)
    assert store.version > v
    assert sorted(p.name for p in (store.root / "a").iterdir()) == [
        "fullchain-2.pem", "key-2.pem", "meta.json"]
    with pytest.raises(StoreError, match="already exists") as e:
        store.import_pem("a", chain2, key2)
    assert e.value.status == 409
    with pytest.raises(StoreError, match="no certificate 'b' to replace") as e:
        store.import_pem("b", chain2, key2, replace=True)
    assert e.value.status == 404


def test_encrypted_key_and_combined_pem(store: CertStore, ca: trustme.CA) -> None:
    chain, key = issue(ca, "e.example.com")
    store.import_pem("enc", chain, _encrypt(key, b"s3cret"), passphrase=b"s3cret")
    stored = store.material("enc")
    assert stored is not None and b"ENCRYPTED" not in stored.key_pem
    store.import_pem("combined", key + chain)  # key and chain in one PEM
    assert store.get("combined") is not None


def test_pkcs12(store: CertStore, ca: trustme.CA) -> None:
    chain, key = issue(ca, "p.example.com")
    res = store.import_pkcs12("p12", _p12(chain, key, b"pw"), passphrase=b"pw")
    assert res.info.serial == serial_of(chain)


def test_delete_refused_while_in_use(tmp_path: Path, ca: trustme.CA) -> None:
    config_users = {"a": ["web"]}
    store = CertStore(tmp_path / "state", usage=lambda cid: config_users.get(cid, []))
    store.import_pem("a", *issue(ca, "a.example.com"))
    store.import_pem("b", *issue(ca, "b.example.com"))
    before = tree_digest(store.root)
    with pytest.raises(StoreError, match="in use by web") as e:
        store.delete("a")
    assert e.value.status == 409
    store.assign("b", "admin")
    with pytest.raises(StoreError, match="in use by admin"):
        store.delete("b")
    store.unassign("b", "admin")
    assert tree_digest(store.root) != before  # the assignment file changed ...
    store.delete("b")  # ... and once unassigned, delete works
    assert store.get("b") is None and not (store.root / "b").exists()
    config_users.clear()
    store.delete("a")
    assert store.list() == ()
    with pytest.raises(StoreError) as e:
        store.delete("a")
    assert e.value.status == 404


def test_managed_certificates_refuse_generic_changes(store: CertStore, ca: trustme.CA) -> None:
    store.import_pem("le", *issue(ca, "le.example.com"), managed_by="letsencrypt")
    with pytest.raises(StoreError, match="managed by letsencrypt") as e:
        store.import_pem("le", *issue(ca, "le.example.com"), replace=True)
    assert e.value.status == 409
    with pytest.raises(StoreError, match="managed by letsencrypt"):
        store.delete("le")
    res = store.import_pem("le", *issue(ca, "le.example.com"), replace=True, override=True)
    assert res.info.managed_by == "letsencrypt" and res.info.generation == 2
    store.delete("le", override=True)


def test_debris_of_an_interrupted_write_is_dropped(tmp_path: Path, ca: trustme.CA) -> None:
    s1 = CertStore(tmp_path / "state")
    chain, key = issue(ca, "a.example.com")
    s1.import_pem("a", chain, key)
    (s1.root / ".tmp-b.1234").mkdir()
    (s1.root / "a" / "fullchain-2.pem").write_bytes(b"half-written next generation")
    s2 = CertStore(tmp_path / "state")
    assert [i.id for i in s2.list()] == ["a"]
    assert s2.material("a") == s1.material("a")
    assert not (s1.root / ".tmp-b.1234").exists()
    assert not (s1.root / "a" / "fullchain-2.pem").exists()


# -- bad input: a clear error naming the problem, and the store byte-for-byte unchanged --------

def _bad_inputs(ca: trustme.CA) -> list[tuple[str, dict[str, object], InputProblem, str]]:
    chain, key = issue(ca, "a.example.com")
    _, other_key = issue(ca, "b.example.com")
    old_chain, old_key = issue(ca, "old.example.com", not_before=NOW - dt.timedelta(days=30),
                               not_after=NOW - dt.timedelta(days=1))
    new_chain, new_key = issue(ca, "new.example.com", not_before=NOW + dt.timedelta(days=1),
                               not_after=NOW + dt.timedelta(days=30))
    enc = _encrypt(key, b"right")
    return [
        ("key-mismatch", {"cert_pem": chain, "key_pem": other_key},
         InputProblem.KEY_MISMATCH, "does not match"),
        ("expired-strict", {"cert_pem": old_chain, "key_pem": old_key, "strict": True},
         InputProblem.EXPIRED, "expired on"),
        ("future-strict", {"cert_pem": new_chain, "key_pem": new_key, "strict": True},
         InputProblem.NOT_YET_VALID, "not valid before"),
        ("wrong-passphrase", {"cert_pem": chain, "key_pem": enc, "passphrase": b"wrong"},
         InputProblem.BAD_PASSPHRASE, "wrong passphrase"),
        ("no-passphrase", {"cert_pem": chain, "key_pem": enc},
         InputProblem.PASSPHRASE_NEEDED, "encrypted"),
        ("not-a-cert", {"cert_pem": b"hello, I am a text file\n", "key_pem": key},
         InputProblem.NOT_A_CERTIFICATE, "not a certificate"),
        ("key-as-cert", {"cert_pem": key, "key_pem": key},
         InputProblem.NOT_A_CERTIFICATE, "not a certificate"),
        ("not-a-key", {"cert_pem": chain, "key_pem": chain},
         InputProblem.NOT_A_KEY, "not a PEM private key"),
        ("bad-id", {"cert_pem": chain, "key_pem": key, "cert_id": "../etc"},
         InputProblem.BAD_ID, "must be 1-64"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_input_leaves_store_unchanged(store: CertStore, ca: trustme.CA, case: int) -> None:
    store.import_pem("existing", *issue(ca, "x.example.com"))
    store.assign("existing", "web")
    name, kwargs, reason, message = _bad_inputs(ca)[case]
    before, listed, version = tree_digest(store.root.parent), store.list(), store.version
    cert_id = str(kwargs.pop("cert_id", "new"))
    for replace, target in ((False, cert_id), (True, "existing")):
        if replace and name == "bad-id":
            continue
        with pytest.raises(CertInputError, match=message) as e:
            store.import_pem(target, replace=replace, **kwargs)  # type: ignore[arg-type]
        assert e.value.reason is reason, name
        assert e.value.status == 400
    assert tree_digest(store.root.parent) == before
    assert store.list() == listed and store.version == version


def test_bad_pkcs12_leaves_store_unchanged(store: CertStore, ca: trustme.CA) -> None:
    chain, key = issue(ca, "p.example.com")
    store.import_pem("existing", chain, key)
    before = tree_digest(store.root.parent)
    with pytest.raises(CertInputError, match="wrong passphrase") as e:
        store.import_pkcs12("p", _p12(chain, key, b"pw"), passphrase=b"nope")
    assert e.value.reason is InputProblem.BAD_PASSPHRASE
    with pytest.raises(CertInputError, match="not PKCS#12") as e:
        store.import_pkcs12("p", chain)
    assert e.value.reason is InputProblem.NOT_PKCS12
    assert tree_digest(store.root.parent) == before


def test_expired_is_a_warning_unless_strict(store: CertStore, ca: trustme.CA) -> None:
    chain, key = issue(ca, "old.example.com", not_before=NOW - dt.timedelta(days=30),
                       not_after=NOW - dt.timedelta(days=1))
    res = store.import_pem("old", chain, key)
    assert len(res.warnings) == 1 and "expired on" in res.warnings[0]
