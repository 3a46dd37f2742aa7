"""acmeclient: an asyncio ACME client (RFC 8555, RFC 9773 ARI, profiles, EAB); the public names."""

from acmeclient.ari import RenewalInfo, cert_id
from acmeclient.challenges import ChallengeResponder, tls_alpn01_certificate
from acmeclient.client import (
    AccountResource,
    AcmeClient,
    CertificateChain,
    ExternalAccountBinding,
    IssuedCertificate,
    OrderResource,
    RevocationReason,
    choose_chain,
    fetch_renewal_info,
    issue,
)
from acmeclient.crypto import (
    CsrSubject,
    KeyType,
    PrivateKey,
    generate_key,
    load_account_key,
    load_private_key,
    make_csr,
    private_key_to_pem,
)
from acmeclient.errors import Problem
from acmeclient.http01 import Http01Responder, StandaloneHttp01Responder
from acmeclient.messages import Directory, Order, Status
from acmeclient.order import PollPolicy

__all__ = [
    "AccountResource",
    "AcmeClient",
    "CertificateChain",
    "ChallengeResponder",
    "CsrSubject",
    "Directory",
    "ExternalAccountBinding",
    "Http01Responder",
    "IssuedCertificate",
    "KeyType",
    "Order",
    "OrderResource",
    "PollPolicy",
    "PrivateKey",
    "Problem",
    "RenewalInfo",
    "RevocationReason",
    "StandaloneHttp01Responder",
    "Status",
    "cert_id",
    "choose_chain",
    "fetch_renewal_info",
    "generate_key",
    "issue",
    "load_account_key",
    "load_private_key",
    "make_csr",
    "private_key_to_pem",
    "tls_alpn01_certificate",
]
