"""Every check of a certificate request before anything is written or sent to the CA: the id
(valid, not taken), the names, the VSs (codes 16, 17, 18; none for dns-01), the key and the
subject."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from acmeclient import KeyType
from acmeclient.crypto import generate_key, make_csr
from acmeclient.errors import CryptoError

from ..certs.store import CertStore, check_id
from ..config.loader import is_fqdn
from ..config.model import MAX_SANS, Config
from ..errors import AdminError, StoreError
from .codes import AcmeCode, LeError
from .model import MANAGED_BY, Template
from .solvers import check_challenge, needs_vs, verify_routes
from .state import LeState
from .storage import STATE_FILES

RSA_SIZES = (2048, 3072, 4096)


def validate_template(state: LeState, config: Config, cert_id: str, t: Template, *,
                      known: Iterable[str] = ()) -> None:
    """Every check before an order: the id, names, VSs (16, 17, 18), subject fields, and
    the CSR itself (built with a throw-away EC key: what acmeclient would refuse at
    finalize is refused here, before the CA is asked for anything)."""
    check_id(cert_id)
    if not t.common_name:
        raise state.problem(LeError(AcmeCode.NO_DOMAIN,
                                    f"certificate {cert_id}: no domain to sign"))
    names = [n.lower() for n in t.names]
    for n in names:
        if not is_fqdn(n.removeprefix("*.")):
            raise AdminError(f"{n!r} is not a fully qualified domain name")
    try:
        check_challenge(cert_id, t)   # a wildcard only with dns-01 (solvers.py)
    except LeError as err:
        raise state.problem(err) from None
    if len(set(names)) != len(names):
        raise AdminError(f"certificate {cert_id}: a name is listed twice")
    if len(t.sans) > MAX_SANS:
        raise AdminError(f"at most {MAX_SANS} SANs, got {len(t.sans)}")
    # Every name needs its VS, except with dns-01 (solvers.needs_vs): no VS answers it.
    if any(not n for n, _ in t.routes) or (
            needs_vs(t.challenge) and any(not vs for _, vs in t.routes)):
        raise state.problem(LeError(AcmeCode.NAMES_VS_MISMATCH,
                                    f"certificate {cert_id}: names and VSs do not match"))
    if t.key_type not in ("ec", "rsa") or (t.key_type == "rsa" and t.key_size not in RSA_SIZES):
        raise AdminError(f"key must be ec or rsa 2048/3072/4096, got {t.key_type} "
                         f"{t.key_size}")
    problem = csr_problem(t)
    if problem is not None:
        raise AdminError(f"certificate {cert_id}: {problem}")
    try:
        verify_routes(config, cert_id, t, known)   # each name's VS, by challenge type
    except LeError as err:
        raise state.problem(err) from None


@functools.lru_cache(maxsize=4096)
def csr_problem(t: Template) -> str | None:
    """Why acmeclient would refuse the CSR of a template (its subject fields, its names), or
    None. It depends on nothing else (the key is a throw-away P-256 one), so each template is
    tried once, not at every renewal (~150 us each: key, CSR, signature)."""
    try:
        # P-256: generated in well under a millisecond, so on the loop.
        make_csr(generate_key(KeyType.EC_P256), [n.lower() for n in t.names], t.subject())
    except CryptoError as exc:
        return str(exc)
    return None


def check_new_id(state: LeState, store: CertStore, cert_id: str) -> None:
    """A new certificate's id: valid, and naming nothing stored, managed or not, whole or
    damaged (whose file would be overwritten)."""
    check_id(cert_id)
    if cert_id in state.entries:
        raise StoreError(f"certificate id {cert_id!r} already exists", status=409)
    info = store.get(cert_id)
    if info is not None and info.managed_by != MANAGED_BY:
        raise state.problem(LeError(
            AcmeCode.NAMES_VS_MISMATCH, f"certificate {cert_id}: the id is taken by a "
            "certificate not managed by Let's Encrypt; choose another id", status=409))
    if info is not None:
        raise StoreError(f"certificate id {cert_id!r} already exists", status=409)
    damage = store.problems.get(cert_id) or (
        state.damaged.get(cert_id) if cert_id not in STATE_FILES else None)
    if damage:
        raise StoreError(f"certificate id {cert_id!r} is taken by damaged state ({damage}); "
                         "repair or remove it first", status=409)
