"""Errors of the certificate store, each naming what was wrong with the input or the request.

StoreError (lbproxy.errors)       status hint for the admin API's answer
 +-- CertInputError               a certificate, key, passphrase, PKCS#12 file or id was
      |                           refused (400); `reason` is a stable short code for clients
      +-- UnsafePathError         (files.py) a path built from input would leave its root
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import StoreError


class InputProblem(StrEnum):
    NOT_A_CERTIFICATE = "not-a-certificate"
    NOT_A_KEY = "not-a-key"
    KEY_MISMATCH = "key-mismatch"
    BAD_PASSPHRASE = "bad-passphrase"
    PASSPHRASE_NEEDED = "passphrase-needed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    UNSUPPORTED_KEY = "unsupported-key"
    NOT_PKCS12 = "not-pkcs12"
    BAD_ID = "bad-id"
    UNSAFE_PATH = "unsafe-path"


class CertInputError(StoreError):
    def __init__(self, reason: InputProblem, message: str) -> None:
        self.reason = reason
        super().__init__(message, status=400)
