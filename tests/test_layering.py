"""The layering rule of lbproxy, read from the imports of every module of acmeclient/ and lbproxy/.

Every import counts, wherever it stands: at module level, inside a function, under
`if TYPE_CHECKING:`, and `importlib.import_module("literal")`. `from a import b` is an import of the
module a.b when that module exists, else of a; the parent packages a dotted import runs on the way
are not counted (so a submodule importing a sibling is not a cycle through its package's
__init__.py).

The layers, lowest first (a module may import its own layer and those below, never one above):
acmeclient <- config, routing, runtime (and lbproxy.errors, the shared base) <- proxy <- workers
<- certs <- letsencrypt <- admin <- app. Besides: acmeclient imports nothing of lbproxy; nothing
but the composition root (lbproxy/app.py, lbproxy/__main__.py) imports lbproxy.admin;
lbproxy.proxy imports none of certs, letsencrypt, admin; no two modules import each other,
directly or around a loop.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("acmeclient", "lbproxy")

# Lowest first. A name covers the module of that name and every module under it (but see ALONE);
# the longest name that covers a module places it. The modules the order does not name stand
# where what they are puts them: lbproxy (the package's face) and lbproxy.errors are the base every
# layer may raise from; the access-log sink serves the data plane; certificate events belong to
# the certificates; metrics is the admin plane's /metrics route; the demo backends are started by
# the composition root, which alone speaks to systemd (sdnotify).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("acmeclient", ("acmeclient",)),
    ("config, routing, runtime", ("lbproxy", "lbproxy.errors", "lbproxy.config", "lbproxy.routing",
                                  "lbproxy.runtime", "lbproxy.servercontrol")),
    ("proxy", ("lbproxy.proxy", "lbproxy.accesslog")),
    ("workers", ("lbproxy.workers",)),
    ("certs", ("lbproxy.certs", "lbproxy.events")),
    ("letsencrypt", ("lbproxy.letsencrypt",)),
    ("admin", ("lbproxy.admin", "lbproxy.metrics", "lbproxy.metrics_dataplane")),
    ("app", ("lbproxy.app", "lbproxy.__main__", "lbproxy.demo", "lbproxy.sdnotify")),
)
# Names in LAYERS that place only the module of that name (the package's face), not all under it.
ALONE = ("lbproxy",)
COMPOSITION_ROOT = ("lbproxy.app", "lbproxy.__main__")
# What the data plane must never reach for (it runs whether or not any of these is configured).
PROXY_FORBIDDEN = ("lbproxy.certs", "lbproxy.letsencrypt", "lbproxy.admin")


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement's edge: `source` (a module, in `path` at `line`) imports `target`."""

    source: str
    path: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} imports {self.target}"


def under(module: str, name: str) -> bool:
    """Whether `module` is `name` or lies inside the package `name`."""
    return module == name or module.startswith(name + ".")


def find_modules(root: Path, packages: Sequence[str]) -> dict[str, tuple[Path, bool]]:
    """Every module of `packages` under `root`: dotted name -> (file, is a package's __init__)."""
    out: dict[str, tuple[Path, bool]] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts.pop()
            out[".".join(parts)] = (path, is_pkg)
    return out


def _known(name: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The longest module of ours that `name` is or lies in (None: not ours)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(source: str, is_pkg: bool, node: ast.ImportFrom, where: str) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_pkg else source.split(".")[:-1]
    if node.level - 1 > len(base) - 1:
        raise ValueError(f"{where}: relative import beyond the top-level package")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _literal_import(node: ast.Call) -> str | None:
    """The module of `importlib.import_module("x")` or `__import__("x")` with a literal name."""
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
    if named and node.args and isinstance(node.args[0], ast.Constant):
        value = node.args[0].value
        if isinstance(value, str) and not value.startswith("."):
            return value
    return None


def read_imports(root: Path, packages: Sequence[str] = PACKAGES) -> list[Import]:
    """Every import between our modules, from the source text (nothing is imported or run)."""
    modules = find_modules(root, packages)
    edges: list[Import] = []
    for source, (path, is_pkg) in modules.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            names: list[str] = []
            line = 0
            if isinstance(node, ast.Import):
                names, line = [alias.name for alias in node.names], node.lineno
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(source, is_pkg, node, f"{rel}:{node.lineno}")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    names.append(sub if sub in modules else base)
                line = node.lineno
            elif isinstance(node, ast.Call) and (literal := _literal_import(node)) is not None:
                names, line = [literal], node.lineno
            for name in dict.fromkeys(names):
                target = _known(name, modules)
                if target is not None and target != source:
                    edges.append(Import(source, rel, line, target))
    return sorted(edges, key=lambda e: (e.path, e.line, e.target))


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the layer that places `module` (None: no layer names it)."""
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            placed = module == name if name in ALONE else under(module, name)
            if placed and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else best[1]


def acmeclient_violations(edges: Iterable[Import]) -> list[str]:
    return [f"{e} (acmeclient is a library of its own: it imports nothing of lbproxy)"
            for e in edges if under(e.source, "acmeclient") and under(e.target, "lbproxy")]


def admin_violations(edges: Iterable[Import]) -> list[str]:
    return [f"{e} (only the composition root {', '.join(COMPOSITION_ROOT)} imports lbproxy.admin)"
            for e in edges
            if under(e.target, "lbproxy.admin") and not under(e.source, "lbproxy.admin")
            and e.source not in COMPOSITION_ROOT]


def proxy_violations(edges: Iterable[Import]) -> list[str]:
    return [f"{e} (the data plane imports none of {', '.join(PROXY_FORBIDDEN)})"
            for e in edges if under(e.source, "lbproxy.proxy")
            and any(under(e.target, name) for name in PROXY_FORBIDDEN)]


def unplaced_modules(modules: Iterable[str]) -> list[str]:
    return [f"{m} is in no layer: add it to LAYERS in tests/test_layering.py where it belongs"
            for m in modules if layer_of(m) is None]


def layer_violations(edges: Iterable[Import]) -> list[str]:
    out = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is not None and dst is not None and dst > src:
            out.append(f"{e} (layer {LAYERS[src][0]!r} imports the higher layer "
                       f"{LAYERS[dst][0]!r})")
    return out


def cycles(edges: Sequence[Import]) -> list[list[str]]:
    """Every import cycle: the modules of each strongly connected component of two or more
    (Tarjan's algorithm, iterative, so a deep import chain cannot exhaust the stack)."""
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e.target)
        graph.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def cycle_violations(edges: Sequence[Import]) -> list[str]:
    out = []
    for component in cycles(edges):
        inside = set(component)
        ties = "\n".join(f"    {e}" for e in edges if e.source in inside and e.target in inside)
        out.append(f"import cycle between {', '.join(component)}:\n{ties}")
    return out


def _check(what: str, problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


# -- the rule, over the project ----------------------------------------------------------------

EDGES = read_imports(ROOT)


def test_every_module_has_a_layer() -> None:
    _check("modules in no layer", unplaced_modules(find_modules(ROOT, PACKAGES)))


def test_acmeclient_imports_nothing_of_lbproxy() -> None:
    _check("imports of lbproxy from acmeclient", acmeclient_violations(EDGES))


def test_only_the_composition_root_imports_admin() -> None:
    _check("imports of lbproxy.admin", admin_violations(EDGES))


def test_proxy_imports_no_certificate_or_admin_code() -> None:
    _check("imports out of lbproxy.proxy", proxy_violations(EDGES))


def test_layers_import_only_downwards() -> None:
    _check("imports of a higher layer", layer_violations(EDGES))


def test_no_import_cycle() -> None:
    _check("import cycles", cycle_violations(EDGES))


# -- the checker itself, over a planted tree -----------------------------------------------------

def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checker_finds_planted_violations(tmp_path: Path) -> None:
    _plant(tmp_path, {
        "acmeclient/__init__.py": "",
        # Inside a function: still an import of lbproxy.
        "acmeclient/client.py": "def f():\n    from lbproxy.proxy import tls\n",
        "lbproxy/__init__.py": "",
        "lbproxy/proxy/__init__.py": "",
        "lbproxy/proxy/tls.py": (
            "from typing import TYPE_CHECKING\n"
            "from ..routing import a\n"
            "if TYPE_CHECKING:\n"
            "    from ..certs.store import Store\n"),
        "lbproxy/certs/__init__.py": "",
        "lbproxy/certs/store.py": "import lbproxy.admin.api\n",
        "lbproxy/admin/__init__.py": "",
        "lbproxy/admin/api.py": "from . import server\n",
        "lbproxy/admin/server.py": "",
        # A cycle closed by a type-only import, and one by importlib.
        "lbproxy/routing/__init__.py": "",
        "lbproxy/routing/a.py": "from . import b\n",
        "lbproxy/routing/b.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from .a import A\n"),
        "lbproxy/config/__init__.py": (
            "import importlib\nimportlib.import_module('lbproxy.config.m')\n"),
        "lbproxy/config/m.py": "from lbproxy.config import x\n",
        "lbproxy/stray.py": "",
    })
    edges = read_imports(tmp_path)
    assert acmeclient_violations(edges) == [
        "acmeclient/client.py:2: acmeclient.client imports lbproxy.proxy.tls "
        "(acmeclient is a library of its own: it imports nothing of lbproxy)"]
    assert [v.split(" (")[0] for v in admin_violations(edges)] == [
        "lbproxy/certs/store.py:1: lbproxy.certs.store imports lbproxy.admin.api"]
    assert [v.split(" (")[0] for v in proxy_violations(edges)] == [
        "lbproxy/proxy/tls.py:4: lbproxy.proxy.tls imports lbproxy.certs.store"]
    assert [v.split(" (")[0] for v in layer_violations(edges)] == [
        "acmeclient/client.py:2: acmeclient.client imports lbproxy.proxy.tls",
        "lbproxy/certs/store.py:1: lbproxy.certs.store imports lbproxy.admin.api",
        "lbproxy/proxy/tls.py:4: lbproxy.proxy.tls imports lbproxy.certs.store",
    ]
    assert "import cycle between lbproxy.routing.a, lbproxy.routing.b" in "\n".join(
        cycle_violations(edges))
    assert cycles(edges) == [["lbproxy.config", "lbproxy.config.m"],
                             ["lbproxy.routing.a", "lbproxy.routing.b"]]
    assert "lbproxy/routing/b.py:3: lbproxy.routing.b imports lbproxy.routing.a" in "\n".join(
        cycle_violations(edges))
    assert unplaced_modules(find_modules(tmp_path, PACKAGES)) == [
        "lbproxy.stray is in no layer: add it to LAYERS in tests/test_layering.py where it belongs"]


def test_the_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    _plant(tmp_path, {
        "acmeclient/__init__.py": "from acmeclient.errors import E\n",
        "acmeclient/errors.py": "class E(Exception): ...\n",
        "lbproxy/__init__.py": "",
        "lbproxy/app.py": "from lbproxy.admin import api\nfrom .proxy import tls\n",
        "lbproxy/admin/__init__.py": "",
        "lbproxy/admin/api.py": "from ..proxy.tls import T\nimport acmeclient\n",
        "lbproxy/proxy/__init__.py": "from .tls import T\n",
        "lbproxy/proxy/tls.py": "from .. import errors\nclass T: ...\n",
        "lbproxy/errors.py": "",
    })
    edges = read_imports(tmp_path)
    assert {(e.source, e.target) for e in edges} == {
        ("acmeclient", "acmeclient.errors"), ("lbproxy.app", "lbproxy.admin.api"),
        ("lbproxy.app", "lbproxy.proxy.tls"), ("lbproxy.admin.api", "lbproxy.proxy.tls"),
        ("lbproxy.admin.api", "acmeclient"), ("lbproxy.proxy", "lbproxy.proxy.tls"),
        ("lbproxy.proxy.tls", "lbproxy.errors")}
    assert not (acmeclient_violations(edges) + admin_violations(edges) + proxy_violations(edges)
                + layer_violations(edges) + cycle_violations(edges))
