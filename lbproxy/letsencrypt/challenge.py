"""HTTP-01 the LoadMaster way: which VSs may answer challenges (code 17 and its sub-codes), the
injection into the runtime of a SubVS without real servers answering 200 text/plain with the key
authorization plus a first-precedence content rule matching the name's host and the token's path
(codes 20-25), and the journal of challenges in progress, kept in `Storage`: a restart clears
leftovers from it, and any holder of the storage can look an answer up in it. Also the per-name
skeleton of every solver served through the runtime (`RuntimeSolver`; tls-alpn-01's is in
solvers.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing
from collections.abc import Callable, Container, Mapping
from typing import Any

from ..config.model import (
    MAX_PATTERN_LENGTH,
    Config,
    ContentRule,
    MatchType,
    NotAvailable,
    Protocol,
    SubVS,
    VirtualService,
    VSKind,
    rule_order,
)
from ..runtime import Injection, Runtime, RuntimeStore
from .codes import AcmeCode, AcmeLog, LeError, VSSubCode
from .storage import JOURNAL, Storage, load_or_none

logger = logging.getLogger(__name__)

CHALLENGE_PATH = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")  # base64url (RFC 8555 §8.3); 256: far above 43
# Injected names carry the token's first 12 characters: unique enough per order, short to read.
NAME_TOKEN_CHARS = 12
NAME_PREFIX = "acme-"


# -- eligibility --------------------------------------------------------------------------------

def ineligibility(vs: VirtualService) -> str | None:
    """Why a VS cannot take a challenge SubVS, or None if it can."""
    if vs.protocol not in (Protocol.HTTP, Protocol.HTTPS):
        return f"VS {vs.name!r} is not an HTTP/HTTPS VS"
    if vs.kind is not VSKind.PROXY:
        return f"VS {vs.name!r} is a {vs.kind.value} VS, not a Layer 7 proxy"
    if vs.real_servers:
        return (f"VS {vs.name!r} has Real Servers on the parent; run `lbproxy vs convert "
                f"{vs.name}` to move them into a SubVS")
    return None


def eligible_services(config: Config) -> list[VirtualService]:
    return [vs for vs in config.virtual_services if ineligibility(vs) is None]


def existing_vs(config: Config, vs_name: str, *, known_before: bool) -> VirtualService:
    """The VS named; else LeError code 17 with sub-code 1 (missing) or 2 (deleted since the
    certificate was requested)."""
    if not vs_name:
        raise LeError(AcmeCode.VS_VERIFY, "no VS stored for a name: Unknown VS",
                      subcode=VSSubCode.MISSING)
    vs = config.vs_by_name(vs_name)
    if vs is None:
        if known_before:
            raise LeError(AcmeCode.VS_VERIFY, f"VS {vs_name!r} has been deleted: Unknown VS",
                          subcode=VSSubCode.DELETED)
        raise LeError(AcmeCode.VS_VERIFY, f"VS {vs_name!r} does not exist: Unknown VS",
                      subcode=VSSubCode.MISSING)
    return vs


def verify_vs(config: Config, vs_name: str, *, known_before: bool) -> VirtualService:
    """The VS if it can answer challenges; else LeError code 17 with sub-code 1 (missing),
    2 (deleted since the certificate was requested) or 3 (no longer eligible)."""
    vs = existing_vs(config, vs_name, known_before=known_before)
    why = ineligibility(vs)
    if why is not None:
        # The VS is known (not 17.1/17.2's "Unknown VS"): it cannot take a challenge SubVS.
        raise LeError(AcmeCode.VS_VERIFY, f"VS not eligible for challenges: {why}",
                      subcode=VSSubCode.NOT_ELIGIBLE)
    return vs


# -- building the injection, step by step (codes 20-25) ------------------------------------------

def challenge_pattern(host: str, token: str) -> str:
    """The rule's regex over host + path (include_host): the name (any case), any port, the
    token (exact: tokens are case-sensitive)."""
    return f"^(?i:{re.escape(host)})(:\\d+)?{re.escape(CHALLENGE_PATH)}{token}$"


def build_injection(
    runtime: Runtime, vs_name: str, host: str, token: str, key_authorization: str,
    fail_at: Container[int] = (),
) -> Injection:
    """The SubVS and rule for one challenge, each step checked and failing with its own code."""
    name = f"{NAME_PREFIX}{token[:NAME_TOKEN_CHARS]}"
    vs = runtime.config.vs_by_name(vs_name)
    # 20: the content rule
    if AcmeCode.ADD_RULE in fail_at:
        raise LeError(AcmeCode.ADD_RULE, f"cannot add content rule {name} (fault injection)")
    if not _TOKEN.fullmatch(token):
        raise LeError(AcmeCode.ADD_RULE, f"cannot add content rule {name}: token not base64url")
    pattern = challenge_pattern(host, token)
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise LeError(AcmeCode.ADD_RULE, f"cannot add content rule {name}: pattern longer than "
                                         f"{MAX_PATTERN_LENGTH} characters")
    if runtime.config.rule_by_name(name) is not None:
        raise LeError(AcmeCode.ADD_RULE, f"cannot add content rule {name}: the name is taken")
    # (no trial re.compile: the host is escaped and the token checked above, so the pattern is
    # valid by construction; the router compiles it once, and a year's 37,000 orders with a
    # pattern each overflow re's cache: a compile per order here was 4% of a simulated year.)
    # include_query: a token followed by any query is not the token (the regex ends at it).
    rule = ContentRule(name=name, match_type=MatchType.REGEX, pattern=pattern, include_host=True,
                       include_query=True)
    # 21: the SubVS (no real servers)
    if AcmeCode.ADD_SUBVS in fail_at:
        raise LeError(AcmeCode.ADD_SUBVS, f"cannot add SubVS {name} to {vs_name} (fault injection)")
    if vs is None or ineligibility(vs) is not None:
        raise LeError(AcmeCode.ADD_SUBVS, f"cannot add SubVS {name} to {vs_name}: "
                                          f"{'no such VS' if vs is None else ineligibility(vs)}")
    if vs.subvs_by_name(name) is not None:
        raise LeError(AcmeCode.ADD_SUBVS, f"cannot add SubVS {name} to {vs_name}: name taken")
    subvs = SubVS(name=name)
    # 22: assign the rule to the SubVS
    if AcmeCode.ASSIGN_RULE in fail_at:
        raise LeError(AcmeCode.ASSIGN_RULE, f"cannot assign rule {name} (fault injection)")
    subvs = dataclasses.replace(subvs, rules=(rule.name,))
    # 24: the "not available" response: 200 OK, text/plain
    if AcmeCode.SET_ERROR_RESPONSE in fail_at:
        raise LeError(AcmeCode.SET_ERROR_RESPONSE,
                      f"cannot set the error response of {name} (fault injection)")
    na = NotAvailable(status=200, body=b"", content_type="text/plain")
    # 25: the error page: the key authorization (ASCII: token "." thumbprint)
    if AcmeCode.SET_ERROR_PAGE in fail_at:
        raise LeError(AcmeCode.SET_ERROR_PAGE,
                      f"cannot set the error page of {name} (fault injection)")
    try:
        body = key_authorization.encode("ascii")
    except UnicodeEncodeError:
        raise LeError(AcmeCode.SET_ERROR_PAGE, f"cannot set the error page of {name}: "
                                               "key authorization is not ASCII") from None
    subvs = dataclasses.replace(subvs, not_available=dataclasses.replace(na, body=body))
    injection = Injection(vs_name, subvs, rule, host.lower().rstrip("."))
    # 23: first precedence, as the data plane will run it
    if AcmeCode.SET_PRECEDENCE in fail_at:
        raise LeError(AcmeCode.SET_PRECEDENCE,
                      f"cannot give rule {name} first precedence (fault injection)")
    trial = Runtime(runtime.generation, runtime.config, (*runtime.injections, injection))
    names = [rn for rn, _ in rule_order(trial.effective_vs(vs))]
    injected = {i.rule.name for i in trial.injections if i.vs == vs_name}
    # first precedence: ahead of every configured rule (other challenges may share the top)
    if rule.name not in names or any(rn not in injected for rn in names[:names.index(rule.name)]):
        raise LeError(AcmeCode.SET_PRECEDENCE,
                      f"cannot give rule {name} first precedence in {vs_name}")
    return injection


# -- the journal of challenges in progress -------------------------------------------------------

class ChallengeJournal:
    """In-progress challenges in storage: (cert id, VS, SubVS, host, token, key authorization),
    written before each injection."""

    def __init__(self, storage: Storage, key: str = JOURNAL) -> None:
        self.storage = storage
        self.key = key
        self.where = storage.describe(key)
        # "<where> is damaged (...)" once a read found it so; set_aside() keeps it for the operator.
        self.damaged = ""

    async def entries(self) -> list[dict[str, str]]:
        data = await load_or_none(self.storage, self.key)
        if data is None:
            return []
        try:
            items = json.loads(data)
        except ValueError as exc:
            self.damaged = f"{self.where} is damaged ({exc})"
            logger.error("challenge journal %s", self.damaged)
            return []
        if not isinstance(items, list):
            self.damaged = f"{self.where} is damaged (not a list)"
            return []
        return [e for e in items if isinstance(e, dict)]

    async def answer(self, host: str, token: str) -> str | None:
        """The key authorization of a challenge in progress, for any holder of the storage."""
        host = host.lower().rstrip(".")
        for e in await self.entries():
            if e.get("host") == host and e.get("token") == token:
                return e.get("key_authorization")
        return None

    async def set_aside(self) -> str:
        """Move a damaged journal out of the way (kept, never overwritten); returns where."""
        aside = f"{self.key}.damaged"
        await self.storage.store(aside, await self.storage.load(self.key))
        await self.storage.delete(self.key)
        self.damaged = ""
        return self.storage.describe(aside)

    async def _write(self, entries: list[dict[str, str]]) -> None:
        # One challenge per line: readable, and written by json's C encoder (an indented dump
        # takes the pure-Python one; this is written twice per order).
        lines = ",\n ".join(json.dumps(e, sort_keys=True) for e in entries)
        await self.storage.store(self.key, f"[{lines}]\n".encode() if entries else b"[]\n")

    async def add(self, cert_id: str, vs: str, subvs: str, *, host: str = "", token: str = "",
                  key_authorization: str = "") -> None:
        """Journal a challenge before it is injected; LeError 21 if it cannot be written
        (nothing is injected that a restart could not find)."""
        entries = [e for e in await self.entries()
                   if not (e.get("vs") == vs and e.get("subvs") == subvs)]
        entry = {"cert": cert_id, "vs": vs, "subvs": subvs}
        if token:
            entry |= {"host": host, "token": token, "key_authorization": key_authorization}
        try:
            await self._write([*entries, entry])
        except OSError as exc:
            raise LeError(AcmeCode.ADD_SUBVS,
                          f"cannot add SubVS {subvs} to {vs}: cannot write the challenge "
                          f"journal {exc.filename or self.where}: {exc.strerror or exc}"
                          ) from None

    async def remove(self, vs: str, subvs: str) -> None:
        """Forget a removed challenge; a failed write is logged (the next start clears the
        entry, whose SubVS no longer exists)."""
        entries = await self.entries()
        keep = [e for e in entries if not (e.get("vs") == vs and e.get("subvs") == subvs)]
        if len(keep) != len(entries):
            try:
                await self._write(keep)
            except OSError as exc:
                logger.error("cannot write the challenge journal %s: %s", self.where,
                             exc.strerror or exc)

    async def clear(self) -> None:
        if await self.storage.exists(self.key):
            await self._write([])


async def clear_leftovers(journal: ChallengeJournal, runtime: RuntimeStore, log: AcmeLog) -> None:
    """Challenges journaled by a previous run: remove any still injected, then forget them;
    their certificates are retried by the scheduler (never issued ones are due at once)."""
    leftovers = await journal.entries()
    if journal.damaged:
        try:
            log.error(f"challenge journal {journal.damaged}; kept aside as "
                      f"{await journal.set_aside()}")
        except OSError as exc:
            log.error(f"challenge journal {journal.damaged}; cannot set it "
                      f"aside: {exc.strerror or exc}")
    for e in leftovers:
        vs, subvs = e.get("vs", ""), e.get("subvs", "")
        if any(i.vs == vs and i.subvs.name == subvs for i in runtime.current.injections):
            await runtime.remove(vs, subvs)
        logger.info("removed challenge leftover %s/%s of %s", vs, subvs, e.get("cert"))
    if leftovers:
        await journal.clear()


# -- the responder --------------------------------------------------------------------------------

class AnswerShare(typing.Protocol):
    """Where a cluster node shares its challenge answers (cluster.ClusterNode): http-01's,
    and tls-alpn-01's (`challenge`; its key authorization, from which each node makes its own
    validation certificate)."""

    async def share(self, cert_id: str, vs: str, host: str, token: str,
                    key_authorization: str, ttl: float, *,
                    challenge: str = "http-01") -> list[str]: ...

    async def withdraw(self, token: str) -> None: ...


# Long enough for any order (issuer.ORDER_TIMEOUT) to end; a dead node's answers expire then.
ANSWER_TTL = 330.0


Live = typing.TypeVar("Live")


class RuntimeSolver(typing.Generic[Live]):
    """The per-name skeleton every solver served through the runtime shares (http-01 here,
    tls-alpn-01 in solvers.py): `routes` maps each requested name (lower case) to the VS
    answering its challenge, a name not in it is code 12; what `_serve` put in place is kept
    per (name, token) until `cleanup`/`cleanup_all`; in a cluster (`share`) the answer goes to
    the other nodes before `present` returns, or what was served is taken away again."""

    challenge_type: str
    share_failure_code: AcmeCode

    def __init__(self, runtime: RuntimeStore, cert_id: str, routes: Mapping[str, str], *,
                 fail_at: Container[int] = (), share: AnswerShare | None = None) -> None:
        self._runtime = runtime
        self._share = share
        self._cert_id = cert_id
        self._routes = {k.lower().rstrip("."): v for k, v in routes.items()}
        self._fail_at = fail_at
        self._live: dict[tuple[str, str], Live] = {}  # (domain, token) -> what is served

    @property
    def live(self) -> tuple[Live, ...]:
        return tuple(self._live.values())

    async def _serve(self, host: str, vs: str, token: str, key_authorization: str) -> Live:
        """Put the answer in place on `vs` (every worker has it on return)."""
        raise NotImplementedError

    async def _unserve(self, served: Live) -> None:
        """Take one served answer away."""
        raise NotImplementedError

    def _serving(self, host: str, vs: str, served: Live) -> str:
        """What failed when the other nodes cannot be given the answer ("cannot ...")."""
        raise NotImplementedError

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        host = domain.lower().rstrip(".")
        vs = self._routes.get(host)
        if vs is None:
            raise LeError(AcmeCode.UNREQUESTED_NAME,
                          f"the CA sent an authorization for {host!r}, which was not requested")
        served = await self._serve(host, vs, token, key_authorization)
        self._live[(host, token)] = served
        if self._share is not None:
            # Any node may receive the CA's request: told before the CA is, or no order.
            try:
                await self._share.share(self._cert_id, vs, host, token, key_authorization,
                                        ANSWER_TTL, challenge=self.challenge_type)
            except OSError as exc:
                await self.cleanup(host, token)
                raise LeError(self.share_failure_code,
                              f"cannot {self._serving(host, vs, served)}: the other nodes "
                              f"cannot be given the answer: {exc.strerror or exc}") from None

    async def cleanup(self, domain: str, token: str) -> None:
        served = self._live.pop((domain.lower().rstrip("."), token), None)
        if served is not None:
            await self._remove(served, token)

    async def cleanup_all(self) -> None:
        """Remove whatever is still served (the order ended in any way)."""
        for key in list(self._live):
            await self._remove(self._live.pop(key), key[1])

    async def _remove(self, served: Live, token: str) -> None:
        try:
            await self._unserve(served)
        finally:
            if self._share is not None:
                await self._share.withdraw(token)


class RuntimeHttp01Responder(RuntimeSolver[Injection]):
    """acmeclient's Http01Responder for one order: injects into the RuntimeStore a SubVS and
    rule per name, journaled. `fail_at` holds codes to provoke (fault injection in tests).
    """

    challenge_type = "http-01"
    share_failure_code = AcmeCode.ADD_SUBVS

    def __init__(self, runtime: RuntimeStore, cert_id: str, routes: Mapping[str, str],
                 journal: ChallengeJournal, *, fail_at: Container[int] = (),
                 share: AnswerShare | None = None) -> None:
        super().__init__(runtime, cert_id, routes, fail_at=fail_at, share=share)
        self._journal = journal

    async def _serve(self, host: str, vs: str, token: str, key_authorization: str) -> Injection:
        verify_vs(self._runtime.current.config, vs, known_before=True)
        injection = build_injection(self._runtime.current, vs, host, token,
                                    key_authorization, self._fail_at)
        await self._journal.add(self._cert_id, vs, injection.subvs.name, host=host,
                                token=token, key_authorization=key_authorization)
        try:
            await self._runtime.inject(injection)
        except Exception as exc:
            await self._journal.remove(vs, injection.subvs.name)
            raise LeError(AcmeCode.ADD_SUBVS,
                          f"cannot inject SubVS {injection.subvs.name} into {vs}: "
                          f"{exc}") from exc
        logger.info("http-01 for %s: SubVS %s and rule in VS %s", host, injection.subvs.name, vs)
        return injection

    def _serving(self, host: str, vs: str, served: Injection) -> str:
        return f"add SubVS {served.subvs.name} to {vs}"

    async def _unserve(self, injection: Injection) -> None:
        try:
            await self._runtime.remove(injection.vs, injection.subvs.name)
        finally:
            await self._journal.remove(injection.vs, injection.subvs.name)
        logger.info("http-01 SubVS %s removed from %s", injection.subvs.name, injection.vs)


class ObservedResponder(RuntimeHttp01Responder):
    """The runtime responder, telling `on_present(domain, vs)` once an answer is served."""

    def __init__(self, *args: Any, on_present: Callable[[str, str], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._on_present = on_present

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        await super().present(domain, token, key_authorization)
        live = self.live
        self._on_present(domain, live[-1].vs if live else "")
