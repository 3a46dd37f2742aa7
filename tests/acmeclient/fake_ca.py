"""A small ACME CA (aiohttp) with what Pebble 2.4 lacks: renewalInfo (RFC 9773) and profiles.

It verifies every JWS (signature, nonce, url, kid), validates http-01 by really fetching the
responder on 127.0.0.1:<http_port> with the domain as Host, and issues from a local CA whose key
identifier and first serial are RFC 9773 §4.1's example, so the first certificate's CertID is the
RFC's own "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE".
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.jwa import JWASignature
from josepy.jwk import JWK

from acmeclient.ari import cert_id

RFC_KEY_ID = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
RFC_SERIAL = 0x87654321
RFC_CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
ERR = "urn:ietf:params:acme:error:"
PROFILES = {"classic": "90-day certificates", "shortlived": "6-day certificates"}
LIFETIMES = {"classic": 90, "shortlived": 6}


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Problem(Exception):
    def __init__(self, status: int, type_: str, detail: str) -> None:
        self.status, self.type, self.detail = status, type_, detail


@dataclass
class Issued:
    pem: str
    account: str
    names: list[str]
    not_before: datetime.datetime
    not_after: datetime.datetime
    replaced: bool = False


@dataclass
class FakeCA:
    http_port: int
    window_retry_after: int = 21600
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path, payload)
    order_poll_retry_after: int | None = None
    poll_times: list[float] = field(default_factory=list)
    base: str = ""
    _nonces: set[str] = field(default_factory=set)
    _accounts: dict[str, JWK] = field(default_factory=dict)
    _orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    _authzs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _certs: dict[str, Issued] = field(default_factory=dict)  # cert id -> issued
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _serials: itertools.count[int] = field(default_factory=lambda: itertools.count(RFC_SERIAL))

    def __post_init__(self) -> None:
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake ARI CA")])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier(RFC_KEY_ID), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )

    # ---- plumbing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._problems])
        r = app.router
        r.add_get("/dir", self.directory)
        r.add_get("/new-nonce", self.new_nonce)
        r.add_post("/new-acct", self.new_account)
        r.add_post("/new-order", self.new_order)
        r.add_post("/order/{id}", self.get_order)
        r.add_post("/order/{id}/finalize", self.finalize)
        r.add_post("/authz/{id}", self.get_authz)
        r.add_post("/chall/{id}", self.challenge)
        r.add_post("/cert/{id}", self.certificate)
        r.add_get("/renewal-info/{cid}", self.renewal_info)
        r.add_get("/renewal-info/", self.renewal_info_missing)
        return app

    @web.middleware
    async def _problems(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
        except Problem as p:
            resp = web.json_response(
                {"type": p.type, "detail": p.detail, "status": p.status},
                status=p.status,
                content_type="application/problem+json",
            )
        resp.headers["Replay-Nonce"] = self._nonce()
        return resp

    def _nonce(self) -> str:
        n = secrets.token_urlsafe(16)
        self._nonces.add(n)
        return n

    async def _verify(self, request: web.Request) -> tuple[str | None, Any, JWK]:
        """Returns (account url or None for jwk-signed, payload or None for POST-as-GET, key)."""
        if request.content_type != "application/jose+json":
            raise Problem(415, ERR + "malformed", "content type must be application/jose+json")
        body = await request.json()
        protected = json.loads(_b64d(body["protected"]))
        if protected.get("nonce") not in self._nonces:
            raise Problem(400, ERR + "badNonce", "unknown nonce")
        self._nonces.discard(protected["nonce"])
        if protected.get("url") != self.base + request.path:
            raise Problem(401, ERR + "unauthorized", "url mismatch")
        if ("jwk" in protected) == ("kid" in protected):
            raise Problem(400, ERR + "malformed", "exactly one of jwk and kid")
        if "kid" in protected:
            key = self._accounts.get(protected["kid"])
            if key is None:
                raise Problem(400, ERR + "accountDoesNotExist", "no such account")
        else:
            key = JWK.from_json(protected["jwk"])
        alg = JWASignature.from_json(protected["alg"])
        signing_input = f"{body['protected']}.{body['payload']}".encode()
        if not alg.verify(key.key, signing_input, _b64d(body["signature"])):
            raise Problem(400, ERR + "malformed", "bad signature")
        payload = json.loads(_b64d(body["payload"])) if body["payload"] else None
        self.requests.append((request.path, payload or {}))
        return protected.get("kid"), payload, key

    # ---- resources

    async def directory(self, request: web.Request) -> web.Response:
        b = self.base
        return web.json_response(
            {
                "newNonce": b + "/new-nonce",
                "newAccount": b + "/new-acct",
                "newOrder": b + "/new-order",
                "revokeCert": b + "/revoke",
                "keyChange": b + "/key-change",
                "renewalInfo": b + "/renewal-info/",
                "meta": {"termsOfService": b + "/tos", "profiles": PROFILES},
            }
        )

    async def new_nonce(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.method == "HEAD" else 204)

    async def new_account(self, request: web.Request) -> web.Response:
        _, payload, key = await self._verify(request)
        url = f"{self.base}/acct/{key.thumbprint().hex()}"
        self._accounts[url] = key
        return web.json_response(
            {"status": "valid", "contact": payload.get("contact", [])},
            status=201,
            headers={"Location": url},
        )

    def _order_json(self, oid: str) -> dict[str, Any]:
        o = self._orders[oid]
        out = {k: v for k, v in o.items() if not k.startswith("_")}
        return out

    async def new_order(self, request: web.Request) -> web.Response:
        kid, payload, _ = await self._verify(request)
        assert kid is not None
        names = [i["value"] for i in payload["identifiers"]]
        profile = payload.get("profile")
        if profile is not None and profile not in PROFILES:
            raise Problem(400, ERR + "invalidProfile", f"profile {profile!r} is not offered")
        replaces = payload.get("replaces")
        if replaces is not None:
            old = self._certs.get(replaces)
            if old is None or old.account != kid or not set(old.names) & set(names):
                raise Problem(400, ERR + "malformed", f"replaces {replaces!r}: no such certificate")
            if old.replaced:
                raise Problem(409, ERR + "alreadyReplaced", f"{replaces} is already replaced")
            old.replaced = True
        oid = str(next(self._ids))
        authz_urls = []
        for n in names:
            aid = str(next(self._ids))
            self._authzs[aid] = {
                "identifier": {"type": "dns", "value": n},
                "status": "pending",
                "challenges": [
                    {
                        "type": "http-01",
                        "url": f"{self.base}/chall/{aid}",
                        "token": secrets.token_urlsafe(32),
                        "status": "pending",
                    }
                ],
                "_account": kid,
            }
            authz_urls.append(f"{self.base}/authz/{aid}")
        order: dict[str, Any] = {
            "status": "pending",
            "identifiers": payload["identifiers"],
            "authorizations": authz_urls,
            "finalize": f"{self.base}/order/{oid}/finalize",
            "_account": kid,
            "_key": self._accounts[kid],
        }
        if profile is not None:
            order["profile"] = profile
        if replaces is not None:
            order["replaces"] = replaces
        self._orders[oid] = order
        return web.json_response(
            self._order_json(oid), status=201, headers={"Location": f"{self.base}/order/{oid}"}
        )

    def _order_status(self, oid: str) -> None:
        o = self._orders[oid]
        if o["status"] == "pending":
            ids = [u.rsplit("/", 1)[1] for u in o["authorizations"]]
            if all(self._authzs[a]["status"] == "valid" for a in ids):
                o["status"] = "ready"
            elif any(self._authzs[a]["status"] == "invalid" for a in ids):
                o["status"] = "invalid"

    async def get_order(self, request: web.Request) -> web.Response:
        await self._verify(request)
        oid = request.match_info["id"]
        self.poll_times.append(asyncio.get_running_loop().time())
        o = self._orders[oid]
        self._order_status(oid)
        headers = {}
        if o["status"] == "processing":
            o["_polls"] = o.get("_polls", 0) + 1
            if self.order_poll_retry_after is not None and o["_polls"] == 1:
                headers["Retry-After"] = str(self.order_poll_retry_after)
            else:
                self._issue(oid)
        return web.json_response(self._order_json(oid), headers=headers)

    async def get_authz(self, request: web.Request) -> web.Response:
        await self._verify(request)
        a = self._authzs[request.match_info["id"]]
        return web.json_response({k: v for k, v in a.items() if not k.startswith("_")})

    async def challenge(self, request: web.Request) -> web.Response:
        kid, _, _ = await self._verify(request)
        a = self._authzs[request.match_info["id"]]
        chal = a["challenges"][0]
        domain = a["identifier"]["value"]
        key = self._accounts[kid]
        thumb = base64.urlsafe_b64encode(key.thumbprint()).rstrip(b"=").decode()
        expected = f"{chal['token']}.{thumb}"
        url = f"http://127.0.0.1:{self.http_port}/.well-known/acme-challenge/{chal['token']}"
        async with (
            aiohttp.ClientSession() as s,
            s.get(url, headers={"Host": domain}) as r,
        ):
            body = (await r.text()).strip()
        if r.status == 200 and body == expected:
            chal["status"] = a["status"] = "valid"
        else:
            chal["status"] = a["status"] = "invalid"
            chal["error"] = {
                "type": ERR + "unauthorized",
                "detail": f"key authorization mismatch: got {body!r}",
                "status": 403,
            }
        return web.json_response(chal)

    async def finalize(self, request: web.Request) -> web.Response:
        kid, payload, _ = await self._verify(request)
        oid = request.match_info["id"]
        self._order_status(oid)
        o = self._orders[oid]
        if o["_account"] != kid:
            raise Problem(403, ERR + "unauthorized", "not your order")
        if o["status"] != "ready":
            raise Problem(403, ERR + "orderNotReady", f"order is {o['status']}")
        csr = x509.load_der_x509_csr(_b64d(payload["csr"]))
        o["_csr"] = csr
        o["status"] = "processing"
        return web.json_response(
            self._order_json(oid), headers={"Location": f"{self.base}/order/{oid}"}
        )

    def _issue(self, oid: str) -> None:
        o = self._orders[oid]
        csr: x509.CertificateSigningRequest = o["_csr"]
        names = [i["value"] for i in o["identifiers"]]
        days = LIFETIMES[o.get("profile", "classic")]
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(next(self._serials))
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(x509.AuthorityKeyIdentifier(RFC_KEY_ID, None, None), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        pem = (
            cert.public_bytes(serialization.Encoding.PEM)
            + self.ca_cert.public_bytes(serialization.Encoding.PEM)
        ).decode()
        cid = cert_id(pem)
        self._certs[cid] = Issued(
            pem, o["_account"], names, now, now + datetime.timedelta(days=days)
        )
        o["status"] = "valid"
        o["certificate"] = f"{self.base}/cert/{cid}"

    async def certificate(self, request: web.Request) -> web.Response:
        await self._verify(request)
        issued = self._certs[request.match_info["id"]]
        return web.Response(text=issued.pem, content_type="application/pem-certificate-chain")

    async def renewal_info(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid.count(".") != 1:
            raise Problem(400, ERR + "malformed", "CertID is keyIdentifier.serial")
        issued = self._certs.get(cid)
        if issued is None:
            raise Problem(404, ERR + "malformed", "unknown certificate")
        life = issued.not_after - issued.not_before
        start = issued.not_before + life * 2 / 3  # window: last third, as Let's Encrypt does
        end = start + life / 6
        if issued.replaced:
            start, end = issued.not_before, issued.not_before + datetime.timedelta(seconds=1)
        return web.json_response(
            {
                "suggestedWindow": {
                    "start": start.isoformat().replace("+00:00", "Z"),
                    "end": end.isoformat().replace("+00:00", "Z"),
                },
                "explanationURL": f"{self.base}/docs/ari",
            },
            headers={"Retry-After": str(self.window_retry_after)},
        )

    async def renewal_info_missing(self, request: web.Request) -> web.Response:
        raise Problem(404, ERR + "malformed", "CertID missing")
