"""The `lbproxy` command: `run` and `check` live here; every other subcommand talks to the admin
API through lbproxy.admin.cli."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .config import load_file
from .config.loader import config_warnings
from .config.model import MAX_WORKERS
from .errors import ConfigError

_LOCAL_COMMANDS = ("run", "check")
# Let's Encrypt commands (and `vs convert`, which makes a VS eligible for challenges).
_LE_COMMANDS = ("le", "backup", "restore")
# `cluster new-key` and `cluster migrate` work on files and Redis; `cluster status` asks the API.
_CLUSTER_COMMANDS = ("cluster",)


def _check(args: argparse.Namespace) -> int:
    try:
        cfg = load_file(args.config, to_run=True)
    except ConfigError as e:
        if args.json:
            print(json.dumps({"ok": False, "problems": [
                {"where": p.where, "message": p.message} for p in e.problems]}))
        else:
            print(f"{args.config}: {len(e.problems)} problem(s)", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
        return 1
    warnings = config_warnings(cfg)
    if args.json:
        print(json.dumps({"ok": True, "virtual_services": len(cfg.virtual_services),
                          "rules": len(cfg.rules), "warnings": [
                              {"where": w.where, "message": w.message} for w in warnings]}))
    else:
        print(f"{args.config}: OK ({len(cfg.virtual_services)} virtual services, "
              f"{len(cfg.rules)} content rules)")
        for w in warnings:
            print(f"  warning: {w}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .app import run_forever

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        print(f"lbproxy run: --workers must be between 0 (one per core) and {MAX_WORKERS}",
              file=sys.stderr)
        return 2
    return run_forever(args.config, demo_backends=args.demo_backends, workers=args.workers)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lbproxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a config file and list every problem")
    c.add_argument("-c", "--config", default="lbproxy.toml")
    c.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="run the load balancer")
    r.add_argument("-c", "--config", default="lbproxy.toml")
    r.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (overrides the config's `workers`; 1 = one process "
                        "that serves, no workers)")
    r.add_argument("--demo-backends", action="store_true",
                   help="also start demo real servers on the config's real-server addresses")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in _LOCAL_COMMANDS and not args_list[0].startswith("-"):
        if args_list[0] in _LE_COMMANDS or args_list[:2] == ["vs", "convert"]:
            from .admin.le_cli import main as le_main

            return le_main(args_list)
        if args_list[0] in _CLUSTER_COMMANDS:
            from .admin.cluster_cli import main as cluster_main

            return cluster_main(args_list)
        from .admin.cli import main as cli_main

        return cli_main(args_list)
    args = _parser().parse_args(args_list)
    if args.command == "check":
        return _check(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
