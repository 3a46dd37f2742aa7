"""The `lbproxy cluster` commands, and how a cluster's state is printed.

    lbproxy cluster new-key FILE
    lbproxy cluster migrate [-c CONFIG] (--to-redis | --to-dir) [--force] [--json]
    lbproxy cluster status [--json]

`new-key` writes a key file; `migrate` copies this host's Let's Encrypt state between its state
directory and the cluster's Redis (lbproxy.letsencrypt.migrate), with lbproxy stopped or running;
neither needs the admin API (a failure names the file or key; exit status 1). `status` asks the
running lbproxy (GET /api/cluster) and takes the admin options of every admin command (-c,
--admin, --token-file, --cacert, --json). Exit status as lbproxy.admin.client's EXIT_* say.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, TextIO

from ..config import load_file
from ..errors import ConfigError, LBProxyError
from .client import AdminClient, ClientError, CommandError, add_json_option, group, table

# -- new-key --------------------------------------------------------------------------------------

def write_new_key(path: Path) -> None:
    """A new encryption key in `path` (mode 0600); an existing file is never overwritten."""
    from ..letsencrypt.sealing import new_key

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists; refusing to overwrite an encryption key (every "
                           "node needs the same one: copy the existing file to the new node)"
                           ) from None
    except OSError as exc:
        raise CommandError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), 0o600)   # whatever the umask said
            f.write(new_key())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


def _new_key(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.file)
    write_new_key(path)
    return {"key_file": str(path)}


def _show_new_key(data: dict[str, Any], out: TextIO) -> None:
    print(f"wrote a new encryption key to {data['key_file']} (mode 0600); copy it to every "
          "node and name it in [cluster] encryption_key_file", file=out)


# -- migrate --------------------------------------------------------------------------------------

def _migrate(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here: `lbproxy status` and the other admin commands never load Redis.
    from ..certs.store import CertStore
    from ..letsencrypt.filestore import FileStorage
    from ..letsencrypt.manager import LE_DIR
    from ..letsencrypt.migrate import KINDS, MigrateError, migrate
    from ..letsencrypt.redisstore import RedisStorage, redact
    from ..letsencrypt.sealing import Sealer, SealError

    config = Path(args.config)
    try:
        cfg = load_file(config)
    except ConfigError as exc:
        raise CommandError("\n".join(str(p) if p.source else f"{config}: {p}"
                                     for p in exc.problems)) from None
    cluster = cfg.cluster
    if cluster is None:
        raise CommandError(f"{config} has no [cluster] table: migrate copies between this "
                           "host's state directory and the cluster's Redis that [cluster] "
                           "names (see docs/config.md)")
    state = cfg.state_path(config)
    le_dir = state / LE_DIR
    if args.to_redis and not le_dir.is_dir():
        raise CommandError(f"{le_dir} does not exist: this host has no Let's Encrypt state "
                           "to copy (is state_dir right?)")
    try:
        sealer = Sealer.from_file(cluster.encryption_key_file)
    except SealError as exc:
        raise CommandError(str(exc)) from None
    try:
        redis = RedisStorage.from_settings(cluster, sealer)
    except OSError as exc:
        raise CommandError(f"cannot read the Redis password file {exc.filename}: "
                           f"{exc.strerror or exc}") from None
    redis_name = f"{redact(cluster.redis_url)} (key prefix {cluster.key_prefix})"
    try:
        files = FileStorage(le_dir)
    except OSError as exc:
        raise CommandError(f"cannot open {le_dir}: {exc.strerror or exc}") from None
    store = None
    warnings: list[str] = []
    if args.to_redis:   # certificates it serves but never shared get an issued/ key
        try:
            store = CertStore(state)
        except (OSError, LBProxyError) as exc:
            raise CommandError(f"cannot open the certificate store in {state}: {exc}") from None
        warnings = [f"certificate store: {problem} (not copied)"
                    for _, problem in sorted(store.problems.items())]

    async def run() -> Any:
        try:
            try:
                await redis.ping()
            except OSError as exc:
                raise CommandError(f"cannot reach Redis {redis.where}: "
                                   f"{exc.strerror or exc}") from None
            if args.to_redis:
                return await migrate(files, redis, store=store, force=args.force,
                                     source_name=str(le_dir), destination_name=redis_name)
            return await migrate(redis, files, force=args.force, source_name=redis_name,
                                 destination_name=str(le_dir))
        finally:
            await redis.close()

    try:
        report = asyncio.run(run())
    except MigrateError as exc:
        raise CommandError(str(exc)) from None
    return {"from": report.source, "to": report.destination, "total": report.total,
            "copied": {k: report.counts[k] for k in KINDS},
            "left_behind": list(report.left_behind), "warnings": warnings}


def _show_migrate(data: dict[str, Any], out: TextIO) -> None:
    print(f"copied {data['total']} key(s) from {data['from']} to {data['to']}:", file=out)
    width = max(len(k) for k in data["copied"])
    for k, n in data["copied"].items():
        print(f"  {k.ljust(width)}  {n}", file=out)
    if data["left_behind"]:
        print(f"left behind (they belong to this node): {', '.join(data['left_behind'])}",
              file=out)
    for w in data["warnings"]:
        print(f"warning: {w}", file=out)


# -- status ---------------------------------------------------------------------------------------

def _seconds(v: Any) -> str:
    return "-" if not isinstance(v, int | float) else f"{v:.1f} s"


def _cell(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _link(view: dict[str, Any]) -> str:
    since = view.get("since") or "?"
    if view.get("connected"):
        return f"connected since {since}"
    return f"UNREACHABLE since {since}"


def print_cluster(view: dict[str, Any], out: TextIO) -> None:
    """`lbproxy cluster status`: this node and its link to Redis, every node seen recently,
    every lock held."""
    answering = view.get("answering") or []
    rows = [("node", _cell(view.get("node"))), ("redis", _cell(view.get("redis"))),
            ("connected", f"{'yes' if view.get('connected') else 'NO'}, since "
                          f"{view.get('since') or '?'}"),
            ("last error", _cell(view.get("last_error"))),
            ("outages", _cell(view.get("outages"))),
            ("answering", f"{len(answering)} challenge(s) of other nodes" if answering else "-")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}", file=out)
    print(file=out)
    if not view.get("connected"):
        print("nodes and locks: not known while Redis is unreachable (this node serves the "
              "certificates it has and places no order)", file=out)
        return
    nodes = view.get("nodes") or []
    if nodes:
        table(("NODE", "PID", "SEEN AGO"),
              [[_cell(n.get("name")), _cell(n.get("pid")), _seconds(n.get("seen_ago"))]
               for n in nodes], out)
    else:
        print("no node seen recently", file=out)
    print(file=out)
    locks = view.get("locks") or []
    if locks:
        table(("LOCK", "NODE", "PID", "EXPIRES IN"),
              [[_cell(lk.get("name")), _cell(lk.get("node")), _cell(lk.get("pid")),
                _seconds(lk.get("expires_in"))] for lk in locks], out)
    else:
        print("no lock held", file=out)


def print_cluster_brief(view: dict[str, Any], out: TextIO) -> None:
    """The CLUSTER section of `lbproxy status`."""
    if "error" in view and "node" not in view:
        print(f"CLUSTER  cannot read the cluster state: {view['error']}", file=out)
        return
    print(f"CLUSTER  node {_cell(view.get('node'))}, Redis {_cell(view.get('redis'))}",
          file=out)
    link = _link(view)
    if view.get("last_error"):
        link += f" (last error: {view['last_error']})"
    print(f"  {link}", file=out)
    if view.get("connected"):
        nodes = ", ".join(_cell(n.get("name")) for n in view.get("nodes") or []) or "none"
        locks = ", ".join(f"{_cell(lk.get('name'))} ({_cell(lk.get('node'))})"
                          for lk in view.get("locks") or []) or "none"
        print(f"  nodes seen: {nodes}; locks held: {locks}", file=out)


def cluster_for_status(client: Any) -> dict[str, Any] | None:
    """GET /api/cluster for `lbproxy status`: None when the node is not in a cluster (404),
    {"error": ...} when it cannot be read."""
    try:
        view = client.get("/api/cluster")
    except ClientError as exc:
        return None if exc.status == 404 else {"error": str(exc)}
    return view if isinstance(view, dict) else {"error": "not a JSON object"}


def _status(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.get("/api/cluster")


# -- parser ---------------------------------------------------------------------------------------

def add_commands(top: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None:
    """`cluster new-key`, `cluster migrate` (no admin API) and `cluster status`."""
    sub = group(top, "cluster", "hosts sharing Let's Encrypt state through Redis")

    p = sub.add_parser("new-key", help="write a new encryption key file (mode 0600)")
    p.add_argument("file", help="the key file to create (refused if it exists)")
    add_json_option(p)
    p.set_defaults(local=_new_key, show=_show_new_key, who="lbproxy cluster new-key")

    p = sub.add_parser("migrate", help="copy this host's Let's Encrypt state to or from Redis")
    p.add_argument("-c", "--config", default="lbproxy.toml",
                   help="config file with the [cluster] table and state_dir")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-redis", action="store_true",
                     help="from <state_dir>/letsencrypt (and the certificate store) to Redis")
    way.add_argument("--to-dir", action="store_true",
                     help="from Redis to <state_dir>/letsencrypt")
    p.add_argument("--force", action="store_true",
                   help="overwrite keys the destination already holds")
    add_json_option(p)
    p.set_defaults(local=_migrate, show=_show_migrate, who="lbproxy cluster migrate")

    p = sub.add_parser("status", parents=[common],
                       help="this node, Redis, the nodes seen and the locks held")
    p.set_defaults(run=_status, show=print_cluster)
