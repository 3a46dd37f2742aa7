"""`python -m acmeclient`: issue a certificate for names into a directory, certbot-style.

    python -m acmeclient --directory URL [--ca-bundle F] [--http-port 80] -d NAME [-d NAME ...]
                         --out DIR [--email E] [--key-type ec-p256] [--profile P]
                         [--preferred-chain ISSUER_CN] [--eab-kid K --eab-hmac-key B64]

Writes DIR/account.key (kept and reused), DIR/account.json (account URL), DIR/privkey.pem,
DIR/cert.pem, DIR/chain.pem and DIR/fullchain.pem, each atomically (temp file, fsync, rename),
keys with mode 0600. Answers HTTP-01 with a standalone responder on --http-host:--http-port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from acmeclient.client import AcmeClient, ExternalAccountBinding
from acmeclient.crypto import (
    CsrSubject,
    KeyType,
    PrivateKey,
    generate_key,
    load_account_key,
    private_key_to_pem,
)
from acmeclient.errors import AccountDoesNotExistError, AcmeError
from acmeclient.http01 import StandaloneHttp01Responder

logger = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory, fsync, rename (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m acmeclient", description=__doc__.splitlines()[0])
    p.add_argument("--directory", required=True, help="ACME directory URL (https)")
    p.add_argument("--ca-bundle", help="PEM bundle to verify the CA's TLS (default: system store)")
    p.add_argument("--http-port", type=int, default=80, help="port for the HTTP-01 responder")
    p.add_argument("--http-host", default="0.0.0.0", help="address for the HTTP-01 responder")
    p.add_argument("-d", "--domain", dest="names", action="append", required=True)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--email", action="append", default=[], help="account contact (repeatable)")
    p.add_argument("--key-type", default=KeyType.EC_P256.value, choices=[k.value for k in KeyType])
    p.add_argument("--account-key-type", default=KeyType.EC_P256.value,
                   choices=[k.value for k in KeyType])  # fmt: skip
    p.add_argument("--profile")
    p.add_argument("--preferred-chain", help="issuer CN of the preferred chain's top certificate")
    p.add_argument("--eab-kid")
    p.add_argument("--eab-hmac-key")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    for field in ("country", "state", "locality", "organization", "organizational-unit"):
        p.add_argument(f"--{field}")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load_state(out: Path, key_type: KeyType) -> tuple[PrivateKey, str | None]:
    """The account key (created and saved on first use) and the saved account URL, if any."""
    out.mkdir(parents=True, exist_ok=True)
    key_path, acct_path = out / "account.key", out / "account.json"
    if key_path.exists():
        account_key = load_account_key(key_path.read_bytes())
    else:
        account_key = generate_key(key_type)
        write_atomic(key_path, private_key_to_pem(account_key), 0o600)
    url = json.loads(acct_path.read_text()).get("url") if acct_path.exists() else None
    return account_key, url


def save_result(out: Path, chain: str, cert_key: PrivateKey, account_url: str) -> None:
    pems = [p + "-----END CERTIFICATE-----\n" for p in chain.split("-----END CERTIFICATE-----")]
    pems = [p.lstrip() for p in pems if "BEGIN CERTIFICATE" in p]
    write_atomic(out / "account.json", json.dumps({"url": account_url}).encode())
    write_atomic(out / "privkey.pem", private_key_to_pem(cert_key), 0o600)
    write_atomic(out / "cert.pem", pems[0].encode())
    write_atomic(out / "chain.pem", "".join(pems[1:]).encode())
    write_atomic(out / "fullchain.pem", "".join(pems).encode())


async def run(
    args: argparse.Namespace, account_key: PrivateKey, account_url: str | None
) -> tuple[str, PrivateKey, str]:
    """Register or find the account, then obtain; returns (chain, certificate key, account URL)."""
    subject = CsrSubject(
        country=args.country,
        state=args.state,
        locality=args.locality,
        organization=args.organization,
        organizational_unit=args.organizational_unit,
    )
    eab = None
    if args.eab_kid or args.eab_hmac_key:
        if not (args.eab_kid and args.eab_hmac_key):
            raise SystemExit("--eab-kid and --eab-hmac-key go together")
        eab = ExternalAccountBinding(args.eab_kid, args.eab_hmac_key)
    cert_key = generate_key(KeyType(args.key_type))
    async with (
        AcmeClient(
            args.directory, account_key, ca_bundle=args.ca_bundle, timeout=args.timeout
        ) as client,
        StandaloneHttp01Responder(args.http_host, args.http_port) as responder,
    ):
        if account_url is not None:
            try:
                account_url = (await client.lookup_account()).url
            except AccountDoesNotExistError:
                account_url = None
        if account_url is None:
            reg = await client.new_account(
                contact=[f"mailto:{e}" for e in args.email],
                terms_of_service_agreed=True,
                eab=eab,
            )
            account_url = reg.url
        chain = await client.obtain_certificate(
            args.names,
            cert_key,
            responder,
            subject=subject,
            profile=args.profile,
            preferred_chain=args.preferred_chain,
        )
    return chain, cert_key, account_url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        account_key, account_url = load_state(args.out, KeyType(args.account_key_type))
        chain, cert_key, account_url = asyncio.run(run(args, account_key, account_url))
        save_result(args.out, chain, cert_key, account_url)
    except AcmeError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"certificate for {', '.join(args.names)} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
