"""Moving a host's Let's Encrypt state between two `Storage`s: a single host's state directory
into a cluster's Redis (`lbproxy cluster migrate --to-redis`) and back (`--to-dir`).

What the hosts share is copied key by key, byte for byte, every key below the root: settings,
the account and its key, each certificate's entry (certs/), each issued chain and key (issued/),
and whatever else the feature keeps there. What belongs to one node stays behind: its locks, its
challenge journal (and a damaged journal set aside), the per-node keys (nodes/) and challenge
answers in flight (answers/). A certificate the host's certificate store serves for Let's Encrypt
without an issued/ key (issued before the state was shared) gets one from the store, so the
other nodes serve it instead of ordering it again.

Nothing is written while the destination already holds a key to be copied, unless forced; keys
only the destination holds are left as they are. Every failure names the key and where it lives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..certs.errors import CertInputError
from ..certs.store import CertStore
from ..errors import LBProxyError
from .filestore import LOCKS
from .model import MANAGED_BY, Issued
from .storage import (
    ACCOUNT,
    ACCOUNT_KEY,
    ANSWERS,
    ENTRIES,
    ISSUED,
    JOURNAL,
    NODES,
    SETTINGS,
    Storage,
    issued_key,
)

# Top-level names that belong to one node: never copied.
PER_NODE = (LOCKS, NODES, ANSWERS)
# Keys nest this deep at most (certs/<id>.json is 2); deeper is refused, not walked for ever.
MAX_DEPTH = 8
# What the report counts, in this order.
KINDS = ("settings", "account", "certificates", "issued", "issued from the certificate store",
         "other")
FROM_STORE = KINDS[4]


class MigrateError(LBProxyError):
    """A refusal or a failure; the message names the key (and where it lives) or the file."""


def kind(key: str) -> str:
    """What a key holds, as the report counts it."""
    if key == SETTINGS:
        return "settings"
    if key in (ACCOUNT, ACCOUNT_KEY):
        return "account"
    if key.startswith(f"{ENTRIES}/"):
        return "certificates"
    if key.startswith(f"{ISSUED}/"):
        return "issued"
    return "other"


def per_node(key: str) -> bool:
    """Whether a key belongs to the node that wrote it (left behind by a migration)."""
    top = key.split("/", 1)[0]
    return top in PER_NODE or top == JOURNAL or top.startswith(f"{JOURNAL}.")


def _order(key: str) -> tuple[int, str]:
    """Settings and account first, then issued certificates before their entries: a node
    already following the cluster that sees an entry finds its certificate stored and picks it
    up instead of ordering it."""
    rank = {SETTINGS: 0, ACCOUNT_KEY: 1, ACCOUNT: 2}.get(key)
    if rank is None:
        rank = 3 if key.startswith(f"{ISSUED}/") else 4 if key.startswith(f"{ENTRIES}/") else 5
    return rank, key


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


@dataclass(slots=True)
class Plan:
    """What a migration writes: keys of the source, and issued certificates built from the
    certificate store (by certificate id); and the per-node keys it leaves behind."""

    keys: list[str] = field(default_factory=list)
    from_store: dict[str, Issued] = field(default_factory=dict)
    left_behind: list[str] = field(default_factory=list)

    def writes(self) -> list[str]:
        """Every key written, in the order they are written."""
        return sorted([*self.keys, *(issued_key(i) for i in self.from_store)], key=_order)


@dataclass(frozen=True, slots=True)
class Report:
    """What a migration copied: counts by kind (KINDS), and the per-node keys left behind."""

    source: str
    destination: str
    counts: dict[str, int]
    left_behind: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def shared_keys(storage: Storage) -> tuple[list[str], list[str]]:
    """(every key to copy, every per-node key left behind), walking the whole storage."""
    keys: list[str] = []
    skipped: list[str] = []
    pending: list[tuple[str, int]] = [("", 0)]
    while pending:
        prefix, depth = pending.pop()
        try:
            children = await storage.list(prefix)
        except (OSError, ValueError, CertInputError) as exc:
            raise MigrateError(f"cannot list {storage.describe(prefix)}: "
                               f"{_why(exc)}") from None
        for key in children:
            if per_node(key):
                skipped.append(key)
                continue
            try:
                terminal = (await storage.stat(key)).terminal
            except FileNotFoundError:   # removed meanwhile
                continue
            except (OSError, ValueError, CertInputError) as exc:
                raise MigrateError(f"cannot read {storage.describe(key)}: {_why(exc)}") from None
            if terminal:
                keys.append(key)
            elif depth + 1 >= MAX_DEPTH:
                raise MigrateError(f"{storage.describe(key)}: keys nest deeper than "
                                   f"{MAX_DEPTH} levels; not the state lbproxy keeps")
            else:
                pending.append((key, depth + 1))
    return sorted(keys, key=_order), sorted(skipped)


def issued_from_store(store: CertStore, have: set[str]) -> dict[str, Issued]:
    """issued/<id>.json for every certificate the store serves for Let's Encrypt whose key is
    not in `have`, from the chain and key the store serves."""
    out: dict[str, Issued] = {}
    for info in store.list():
        if info.managed_by != MANAGED_BY or issued_key(info.id) in have:
            continue
        material = store.material(info.id)
        if material is None:
            raise MigrateError(f"certificate {info.id}: no chain and key in "
                               f"{store.root / info.id}")
        out[info.id] = Issued(material.chain_pem, material.key_pem)
    return out


async def plan(source: Storage, store: CertStore | None = None) -> Plan:
    keys, skipped = await shared_keys(source)
    from_store = issued_from_store(store, set(keys)) if store is not None else {}
    return Plan(keys, from_store, skipped)


async def conflicts(p: Plan, destination: Storage) -> list[str]:
    """The keys to be written that the destination holds already."""
    out = []
    for key in p.writes():
        try:
            if await destination.exists(key):
                out.append(key)
        except (OSError, ValueError, CertInputError) as exc:
            raise MigrateError(f"cannot read {destination.describe(key)}: {_why(exc)}") from None
    return out


async def migrate(source: Storage, destination: Storage, *, store: CertStore | None = None,
                  force: bool = False, source_name: str = "", destination_name: str = "",
                  ) -> Report:
    """Copy the shared state of `source` to `destination` (with `store`: plus issued/ keys
    built from it). Raises MigrateError, before writing anything, when there is nothing to copy
    or (unless `force`) the destination holds a key to be written; on a failure midway, what was
    copied before it stays and the error says how far it got."""
    p = await plan(source, store)
    src = source_name or source.describe("")
    dst = destination_name or destination.describe("")
    writes = p.writes()
    if not writes:
        raise MigrateError(f"nothing to copy: {src} holds no Let's Encrypt state (settings, "
                           "account or certificates)")
    if not force:
        taken = await conflicts(p, destination)
        if taken:
            shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5
                                            else "")
            raise MigrateError(f"{dst} already holds {len(taken)} of the {len(writes)} keys to "
                               f"copy ({shown}); nothing was copied (--force overwrites them)")
    built_here = {issued_key(cert_id): v for cert_id, v in p.from_store.items()}
    counts: Counter[str] = Counter()
    for key in writes:
        built = built_here.get(key)
        if built is not None:
            data, what = built.to_bytes(), FROM_STORE
        else:
            try:
                data, what = await source.load(key), kind(key)
            except (OSError, ValueError, CertInputError) as exc:
                raise MigrateError(f"cannot read {source.describe(key)}: {_why(exc)}"
                                   f"{_so_far(counts)}") from None
        try:
            await destination.store(key, data)
        except (OSError, ValueError, CertInputError) as exc:
            raise MigrateError(f"cannot write {destination.describe(key)}: {_why(exc)}"
                               f"{_so_far(counts)}") from None
        counts[what] += 1
    return Report(src, dst, {k: counts[k] for k in KINDS}, tuple(p.left_behind))


def _so_far(counts: Counter[str]) -> str:
    n = sum(counts.values())
    return f" ({n} key(s) were copied before it; --force copies them all again)" if n else ""
