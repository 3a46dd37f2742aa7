"""Which data-plane modules run compiled, and loading their Python sources instead when a
compiled build is stale (a module edited after it was compiled) or `LBPROXY_PURE=1` asks so.

setup.py compiles the hot modules with mypyc into extension modules next to their sources; the
import system prefers an extension module, so an edited source would go unnoticed behind its old
build. All or none: a compiled class cannot be subclassed by an interpreted one, so when any is
stale every module that has a build is loaded from source.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PACKAGE = __name__.rpartition(".")[0]


def builds(here: Path = HERE) -> dict[str, tuple[Path, Path]]:
    """module name -> (its extension module, its source), for every hot module built in
    `here` (this package's directory)."""
    out: dict[str, tuple[Path, Path]] = {}
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in here.glob("*" + suffix):
            name = ext.name[:-len(suffix)]
            source = here / f"{name}.py"
            if source.is_file():
                out[f"{PACKAGE}.{name}"] = (ext, source)
    return out


def stale(found: dict[str, tuple[Path, Path]]) -> list[str]:
    """The modules whose build is older than their source, in a checkout. An installed copy
    (under site-packages) is never edited in place, and its files' times are those of the
    install, in whatever order pip wrote them."""
    return sorted(name for name, (ext, source) in found.items()
                  if not {"site-packages", "dist-packages"} & set(ext.parts)
                  and ext.stat().st_mtime < source.stat().st_mtime)


class SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the listed modules as their .py sources, ahead of their extension modules."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(
            fullname, source)


def choose() -> str:
    """Install the source finder if needed (before any hot module is imported); returns how the
    hot path runs: "compiled", "pure" (no build) or "source" (a build, not used: why)."""
    found = builds()
    if not found:
        return "pure"
    old = stale(found)
    if not old and os.environ.get("LBPROXY_PURE") != "1":
        return "compiled"
    why = "LBPROXY_PURE=1" if not old else "stale build of " + ", ".join(
        n.rpartition(".")[2] for n in old)
    if not any(isinstance(f, SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder({n: src for n, (_, src) in found.items()}))
    logger.debug("hot path from source (%s)", why)
    return f"source ({why})"


MODE = choose()
