"""The `lbproxy` program: `run` and `check` (the config file) live here; every command, theirs
included, is parsed by the one parser (lbproxy.admin.cli.build_parser) and run by
lbproxy.admin.client.dispatch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .admin import cli
from .admin.client import EXIT_FAILED, EXIT_OK, EXIT_USAGE, quiet_on_closed_pipe
from .config import load_file
from .config.loader import config_warnings
from .config.model import MAX_WORKERS
from .errors import ConfigError, ConfigProblem


def _problem(p: ConfigProblem) -> dict[str, Any]:
    """A problem or warning as `check --json` prints it: "line" when the problem knows it, and
    "label", its place with the VS/SubVS names, when that differs from "where"."""
    out: dict[str, Any] = {"where": p.where, "message": p.message}
    if p.line is not None:
        out["line"] = p.line
    if p.label and p.label != p.where:
        out["label"] = p.label
    return out


def _check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        cfg = load_file(args.config, to_run=True)
    except ConfigError as e:
        if args.json:
            print(json.dumps({"ok": False, "problems": [_problem(p) for p in e.problems]}),
                  file=out)
        else:
            print(f"{args.config}: {len(e.problems)} problem(s)", file=err)
            for p in e.problems:
                print(f"  {p}", file=err)
        return EXIT_FAILED
    warnings = config_warnings(cfg, args.config)
    if args.json:
        print(json.dumps({"ok": True, "virtual_services": len(cfg.virtual_services),
                          "rules": len(cfg.rules),
                          "warnings": [_problem(w) for w in warnings]}), file=out)
    else:
        print(f"{args.config}: OK ({len(cfg.virtual_services)} virtual services, "
              f"{len(cfg.rules)} content rules)", file=out)
        for w in warnings:
            print(f"  warning: {w}", file=err)
    return EXIT_OK


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .app import run_forever

    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        print(f"lbproxy run: --workers must be between 0 (one per core) and {MAX_WORKERS}",
              file=err)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_forever(args.config, demo_backends=args.demo_backends, workers=args.workers,
                       watch=args.watch)


def add_commands(top: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None:
    """`run` and `check`: they read the config file, not the admin API."""
    r = top.add_parser("run", help="run the load balancer",
                       description="Run the load balancer in the foreground until SIGTERM/SIGINT;"
                                   " SIGHUP (or `lbproxy reload`) applies the config file.")
    r.add_argument("-c", "--config", default="lbproxy.toml", help="config file (default "
                   "lbproxy.toml)")
    r.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (overrides the config's `workers`; 1 = one process "
                        "that serves, no workers)")
    r.add_argument("--watch", action="store_true",
                   help="also apply the config file when it changes (and has settled)")
    r.add_argument("--demo-backends", action="store_true",
                   help="also start demo real servers on the config's real-server addresses")
    r.set_defaults(main=_run)
    c = top.add_parser("check", help="validate a config file and list every problem",
                       description="Validate a config file and list every problem; exit status "
                                   "1 if there is any.")
    c.add_argument("-c", "--config", default="lbproxy.toml", help="config file (default "
                   "lbproxy.toml)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(main=_check)


def _parser() -> argparse.ArgumentParser:
    """The parser of every `lbproxy` command."""
    return cli.build_parser(add_commands)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """`lbproxy ARGV...`; the exit status (lbproxy.admin.client's EXIT_*). Quiet when the reader
    of stdout goes away early (EXIT_PIPE, no traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return quiet_on_closed_pipe(
        lambda: cli.main(args, out=out, err=err, local=(add_commands,)))


if __name__ == "__main__":
    sys.exit(main())
