"""The Let's Encrypt Certs feature: an ACME account, certificates ordered by HTTP-01 through
challenge SubVSs (or tls-alpn-01, or dns-01 by RFC 2136: solvers.py), renewed on schedule, kept
in a `Storage` (the state directory by default) and served from the SSL certificate store
(lbproxy.certs). `LEManager` is its one entry point."""

from .backup import BackupError, backup_from_text, backup_to_text
from .codes import AcmeCode, LeError, VSSubCode
from .filestore import FileStorage
from .issuer import AcmeClientLike, ClientFactory, default_client_factory
from .manager import LEManager
from .memstore import MemoryStorage
from .model import Account, Entry, Settings, Template
from .storage import KeyInfo, Locker, Storage

__all__ = [
    "Account",
    "AcmeClientLike",
    "AcmeCode",
    "BackupError",
    "ClientFactory",
    "Entry",
    "FileStorage",
    "KeyInfo",
    "LEManager",
    "LeError",
    "Locker",
    "MemoryStorage",
    "Settings",
    "Storage",
    "Template",
    "VSSubCode",
    "backup_from_text",
    "backup_to_text",
    "default_client_factory",
]
