"""TLS session ticket keys shared between processes, installed on a Python SSLContext via ctypes.

Python's `ssl` module has no API for ticket keys, so this module reaches the `SSL_CTX` under an
`ssl.SSLContext` and talks to the same libssl/libcrypto the `_ssl` module is linked against:

- the pointer: CPython's `PySSLContext` is `PyObject_HEAD` then `SSL_CTX *ctx`, so it sits
  `object.__basicsize__` bytes into the object. The layout is proved once per process on a probe
  context (options changed from Python must show through `SSL_CTX_get_options`), and every
  context is checked again (options and verify mode) before anything is written to it.
- the keys: a ticket key callback (`SSL_CTX_set_tlsext_ticket_key_evp_cb`, OpenSSL 3) encrypts
  new tickets under keys[0] and decrypts tickets under any key of the list; a ticket under an
  older key is accepted and renewed. keys[0] is also installed as OpenSSL's static ticket key
  (`SSL_CTRL_SET_TLSEXT_TICKET_KEYS`), which takes over if the callback is removed (below).
- lifetime: the callback lives as long as the Python SSLContext. When that object dies, a
  weakref finalizer removes the callback from the `SSL_CTX` (which may live on inside open
  connections) before CPython frees it, so OpenSSL falls back to the static keys[0] instead of
  calling freed memory.

TLS 1.2 tickets and TLS 1.3 stateless tickets both go through these keys. OpenSSL encrypts and
decrypts tickets with the keys of the connection's *session context*: the context the
connection was created from (the listener's), not one an SNI callback switches to. Setting the
keys on the listener context is what matters; setting them on the per-certificate contexts too
is harmless (they are used when such a context is itself a listener).

Cost: one Python callback per ticket issued or presented, 3.5-5 us each on the machine this was
written on (1 call for a TLS 1.2 full or resumed handshake, 1 for a TLS 1.3 full one: tls.py
has it issue one ticket where OpenSSL's default is two; +1 when a ticket under an older key is
renewed): well under 1% of a ~1 ms handshake. Installing keys on a new context takes ~50 us,
replacing them ~20 us.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import ssl
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import LBProxyError

logger = logging.getLogger(__name__)

# One ticket key as OpenSSL lays out SSL_CTRL_SET_TLSEXT_TICKET_KEYS: a 16-byte key name (sent in
# the clear in every ticket, picks the key on decryption), a 32-byte HMAC-SHA256 secret and a
# 32-byte AES-256-CBC key.
_NAME_BYTES = 16
_HMAC_BYTES = 32
_AES_BYTES = 32
TICKET_KEY_BYTES = _NAME_BYTES + _HMAC_BYTES + _AES_BYTES  # = 80
_IV_BYTES = 16  # the AES block size, the IV length of AES-256-CBC

# From openssl/ssl.h and openssl/tls1.h (OpenSSL 3.0).
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
# From openssl/core.h and openssl/params.h.
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value  # (size_t)-1
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
_VERIFY_BITS = {
    ssl.CERT_NONE: 0,
    ssl.CERT_OPTIONAL: _SSL_VERIFY_PEER,
    ssl.CERT_REQUIRED: _SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
}
_OPENSSL_3 = 0x30000000  # OpenSSL_version_num() of 3.0.0: the EVP_MAC ticket callback's release

# What the ticket callback returns to OpenSSL (SSL_CTX_set_tlsext_ticket_key_evp_cb(3)).
_CB_NO_TICKET = 0  # enc=1: issue no ticket; enc=0: ticket unknown, do a full handshake
_CB_OK = 1
_CB_OK_RENEW = 2  # enc=0: ticket valid, but under an older key: issue a new one

# Where the installed state hangs on the SSLContext (ssl.SSLContext instances have a __dict__).
_ATTR = "_lbproxy_ticket_keys"


class TicketKeysUnavailable(LBProxyError):
    """Ticket keys cannot be installed here: libssl/libcrypto symbols missing, not CPython, not
    OpenSSL 3, or a context whose SSL_CTX could not be verified."""


def new_ticket_key() -> bytes:
    """A fresh random ticket key (name, HMAC secret and AES key all from os.urandom)."""
    return os.urandom(TICKET_KEY_BYTES)


def tickets_supported() -> bool:
    """Whether `set_ticket_keys` can work in this process (checked once, then cached)."""
    return isinstance(_openssl(), _OpenSSL)


def set_ticket_keys(ctx: ssl.SSLContext, keys: Sequence[bytes]) -> None:
    """Encrypt new session tickets of `ctx` under keys[0]; accept tickets under any of `keys`
    (a ticket under keys[1:] resumes and is renewed under keys[0]).

    Calling it again replaces the list (rotation: pass [new, *old]). Each key is
    TICKET_KEY_BYTES long (see `new_ticket_key`). Set the keys on every context a listener is
    created from; the contexts an SNI callback switches to do not take part (module docstring).

    Raises ValueError for an empty list or a key of the wrong size, TypeError if `ctx` is not an
    SSLContext, and TicketKeysUnavailable when it cannot work here (`tickets_supported()` is
    False, or this context's SSL_CTX did not pass the checks): it never silently does nothing.
    Call it from one thread per context (the data plane's event loop); handshakes running in
    other threads meanwhile are fine.
    """
    table = _KeyTable.build(keys)
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"set_ticket_keys needs an ssl.SSLContext, not {type(ctx).__name__}")
    lib = _openssl()
    if not isinstance(lib, _OpenSSL):
        raise TicketKeysUnavailable(f"TLS session ticket keys cannot be set: {lib}")
    installed: _Installed | None = getattr(ctx, _ATTR, None)
    if installed is not None:
        installed.table = table
        lib.set_static_key(installed.ssl_ctx, keys[0])
        return
    ptr = lib.ssl_ctx_of(ctx)
    installed = _Installed(table, ptr)
    thunk = lib.callback_type(_callback(lib, installed))
    # The static key first: it is what OpenSSL uses once the callback is removed.
    lib.set_static_key(ptr, keys[0])
    if lib.set_callback(ptr, thunk) != 1:
        raise TicketKeysUnavailable("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
    finalizer = weakref.finalize(ctx, lib.remove_callback, ptr, thunk)
    finalizer.atexit = False  # at exit no handshake runs; the process frees everything
    setattr(ctx, _ATTR, installed)


# -- key material ----------------------------------------------------------------------------------

# The HMAC digest of every ticket, as OpenSSL's own tickets use. An immutable bytes constant: the
# OSSL_PARAM arrays point into it for the life of the process.
_DIGEST = b"SHA256"


class _OSSLParam(ctypes.Structure):
    """struct ossl_param_st (openssl/core.h)."""

    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


@dataclass(frozen=True, slots=True)
class _Key:
    """One key, as ready-made C buffers the callback hands to OpenSSL without conversions."""

    name: bytes
    name_buf: ctypes.Array[ctypes.c_char]
    aes_key: ctypes.Array[ctypes.c_char]
    hmac_key: ctypes.Array[ctypes.c_char]  # referenced by mac_params
    mac_params: ctypes.Array[_OSSLParam]  # {"key": hmac_key, "digest": "SHA256"}


@dataclass(frozen=True, slots=True)
class _KeyTable:
    """A key list: the one that encrypts, and every key by name with "renew if used"."""

    current: _Key
    by_name: dict[bytes, tuple[_Key, bool]]

    @staticmethod
    def build(keys: Sequence[bytes]) -> _KeyTable:
        if isinstance(keys, bytes | bytearray) or not keys:
            raise ValueError("ticket keys: a non-empty list of keys is needed")
        prepared: list[_Key] = []
        for i, raw in enumerate(keys):
            if not isinstance(raw, bytes) or len(raw) != TICKET_KEY_BYTES:
                raise ValueError(f"ticket key {i} is not {TICKET_KEY_BYTES} bytes")
            prepared.append(_prepare(raw))
        by_name: dict[bytes, tuple[_Key, bool]] = {}
        for i, key in enumerate(prepared):
            by_name.setdefault(key.name, (key, i > 0))  # a repeated name: the newer key wins
        return _KeyTable(prepared[0], by_name)


def _prepare(raw: bytes) -> _Key:
    name = raw[:_NAME_BYTES]
    hmac_key = ctypes.create_string_buffer(raw[_NAME_BYTES:_NAME_BYTES + _HMAC_BYTES],
                                           _HMAC_BYTES)
    aes_key = ctypes.create_string_buffer(raw[_NAME_BYTES + _HMAC_BYTES:], _AES_BYTES)
    params = (_OSSLParam * 3)(
        _OSSLParam(b"key", _OSSL_PARAM_OCTET_STRING, ctypes.addressof(hmac_key), _HMAC_BYTES,
                   _OSSL_PARAM_UNMODIFIED),  # OSSL_MAC_PARAM_KEY
        _OSSLParam(b"digest", _OSSL_PARAM_UTF8_STRING,
                   ctypes.cast(ctypes.c_char_p(_DIGEST), ctypes.c_void_p).value, len(_DIGEST),
                   _OSSL_PARAM_UNMODIFIED),  # OSSL_MAC_PARAM_DIGEST
        _OSSLParam(None, 0, None, 0, 0),  # OSSL_PARAM_END
    )
    return _Key(name, ctypes.create_string_buffer(name, _NAME_BYTES), aes_key, hmac_key, params)


@dataclass(slots=True)
class _Installed:
    """What one context carries: its SSL_CTX pointer and the current key table (swapped whole
    on rotation, read by the callback)."""

    table: _KeyTable
    ssl_ctx: int


_Callback = Callable[[int | None, int, int, int, int, int], int]


def _callback(lib: _OpenSSL, installed: _Installed) -> _Callback:
    """The ticket key callback of one context. It runs inside OpenSSL's handshake (ctypes takes
    the GIL for it); any failure answers "no ticket" / "unknown ticket", never an exception."""
    memmove = ctypes.memmove
    string_at = ctypes.string_at
    rand_bytes = lib.RAND_bytes
    encrypt_init = lib.EVP_EncryptInit_ex
    decrypt_init = lib.EVP_DecryptInit_ex
    mac_set_params = lib.EVP_MAC_CTX_set_params
    aes = lib.aes_256_cbc

    def ticket_key_cb(_ssl: int | None, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int,
                      enc: int) -> int:
        try:
            table = installed.table
            if enc == 1:
                key = table.current
                memmove(key_name, key.name_buf, _NAME_BYTES)
                if (rand_bytes(iv, _IV_BYTES) != 1
                        or encrypt_init(cipher_ctx, aes, None, key.aes_key, iv) != 1
                        or mac_set_params(mac_ctx, key.mac_params) != 1):
                    return _CB_NO_TICKET
                return _CB_OK
            hit = table.by_name.get(string_at(key_name, _NAME_BYTES))
            if hit is None:
                return _CB_NO_TICKET
            key, renew = hit
            if (mac_set_params(mac_ctx, key.mac_params) != 1
                    or decrypt_init(cipher_ctx, aes, None, key.aes_key, iv) != 1):
                return _CB_NO_TICKET
            return _CB_OK_RENEW if renew else _CB_OK
        except BaseException:  # an exception must not cross into C: ctypes would return garbage
            try:
                logger.exception("TLS session ticket callback failed; no ticket this time")
            except BaseException:  # logging itself failed; the answer still stands
                pass
            return _CB_NO_TICKET

    return ticket_key_cb


# -- the OpenSSL binding ---------------------------------------------------------------------------

class _OpenSSL:
    """The libssl/libcrypto functions used here, from the very libraries `_ssl` is linked with.

    dlsym() through a handle of the `_ssl` extension searches it and its dependencies in load
    order, so it finds the same libssl.so.3 the ssl module uses (or OpenSSL linked into `_ssl`
    itself), never another copy that happens to be on the system.
    """

    def __init__(self, path: str | None) -> None:
        lib = ctypes.CDLL(path)
        vp, c_int = ctypes.c_void_p, ctypes.c_int

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(lib, name)  # AttributeError when missing
            f.restype = restype
            f.argtypes = argtypes
            return f

        version = fn("OpenSSL_version_num", ctypes.c_ulong)()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise OSError(f"libssl found ({version:#x}) is not the one ssl reports "
                          f"({ssl.OPENSSL_VERSION_NUMBER:#x})")
        if version < _OPENSSL_3:
            raise OSError(f"OpenSSL {ssl.OPENSSL_VERSION} is older than 3.0")
        self.SSL_CTX_get_options = fn("SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.SSL_CTX_get_verify_mode = fn("SSL_CTX_get_verify_mode", c_int, vp)
        self.SSL_CTX_ctrl = fn("SSL_CTX_ctrl", ctypes.c_long, vp, c_int, ctypes.c_long, vp)
        self.callback_type = ctypes.CFUNCTYPE(c_int, vp, vp, vp, vp, vp, c_int)
        self.SSL_CTX_set_tlsext_ticket_key_evp_cb = fn(
            "SSL_CTX_set_tlsext_ticket_key_evp_cb", c_int, vp, self.callback_type)
        self.RAND_bytes = fn("RAND_bytes", c_int, vp, c_int)
        self.EVP_EncryptInit_ex = fn("EVP_EncryptInit_ex", c_int, vp, vp, vp, vp, vp)
        self.EVP_DecryptInit_ex = fn("EVP_DecryptInit_ex", c_int, vp, vp, vp, vp, vp)
        self.EVP_MAC_CTX_set_params = fn("EVP_MAC_CTX_set_params", c_int, vp, vp)
        # Fetched once for the process, as OpenSSL's own ticket code fetches per ticket.
        aes = fn("EVP_CIPHER_fetch", vp, vp, ctypes.c_char_p, ctypes.c_char_p)(
            None, b"AES-256-CBC", None)
        if not aes:
            raise OSError("EVP_CIPHER_fetch(AES-256-CBC) failed")
        self.aes_256_cbc: int = aes
        self._prove_layout()

    def _pointer_at(self, ctx: ssl.SSLContext) -> int:
        # PySSLContext (Modules/_ssl.c): PyObject_HEAD, then SSL_CTX *ctx.
        return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0

    def _prove_layout(self) -> None:
        if (sys.implementation.name != "cpython"
                or _ssl_context_size() < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)):
            raise OSError(f"the SSLContext layout is known for CPython only, not "
                          f"{sys.implementation.name} {sys.version}")
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ptr = self._pointer_at(probe)
        if not ptr:
            raise OSError("no SSL_CTX pointer where CPython keeps it")
        for flip in (ssl.OP_NO_TICKET, ssl.OP_NO_COMPRESSION):
            before = self.SSL_CTX_get_options(ptr)
            probe.options ^= flip
            if self.SSL_CTX_get_options(ptr) != before ^ flip or before != probe.options ^ flip:
                raise OSError("SSLContext layout not as expected (options do not match)")

    def ssl_ctx_of(self, ctx: ssl.SSLContext) -> int:
        """The SSL_CTX* under `ctx`, after checking it against what Python reports."""
        ptr = self._pointer_at(ctx)
        if (not ptr
                or self.SSL_CTX_get_options(ptr) != ctx.options
                or self.SSL_CTX_get_verify_mode(ptr) & 0x03 != _VERIFY_BITS[ctx.verify_mode]):
            raise TicketKeysUnavailable("the SSLContext's SSL_CTX does not match what Python "
                                        "reports; ticket keys not set")
        return ptr

    def set_static_key(self, ptr: int, key: bytes) -> None:
        buf = ctypes.create_string_buffer(key, TICKET_KEY_BYTES)  # OpenSSL copies it
        if self.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, buf) != 1:
            raise TicketKeysUnavailable("SSL_CTRL_SET_TLSEXT_TICKET_KEYS failed")

    def set_callback(self, ptr: int, thunk: ctypes._CFunctionType) -> int:
        return int(self.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, thunk))

    def remove_callback(self, ptr: int, thunk: ctypes._CFunctionType) -> None:
        """Run when the SSLContext dies, before CPython frees its SSL_CTX reference: connections
        holding the SSL_CTX go on with the static key, and `thunk` may be freed after this."""
        del thunk  # held by the finalizer until now
        self.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, self.callback_type())


def _ssl_context_size() -> int:
    import _ssl

    return int(_ssl._SSLContext.__basicsize__)


@functools.cache
def _openssl() -> _OpenSSL | str:
    """The binding, or why there is none (computed once per process)."""
    import _ssl

    # No file: _ssl is built into the interpreter, and OpenSSL with it (the global namespace).
    path: str | None = getattr(_ssl, "__file__", None)
    try:
        return _OpenSSL(path)
    except (OSError, AttributeError, ValueError) as e:
        logger.debug("ticket keys unavailable: %s", e)
        return f"{e}"
