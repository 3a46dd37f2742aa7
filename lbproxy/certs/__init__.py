"""The SSL certificate store: what the data plane serves (lbproxy.letsencrypt feeds it)."""

from .errors import CertInputError, InputProblem
from .parse import ParsedCertificate, parse_pem, parse_pkcs12
from .store import ADMIN_TARGET, CertInfo, CertStore, ImportResult, config_usage

__all__ = [
    "ADMIN_TARGET",
    "CertInfo",
    "CertInputError",
    "CertStore",
    "ImportResult",
    "InputProblem",
    "ParsedCertificate",
    "config_usage",
    "parse_pem",
    "parse_pkcs12",
]
