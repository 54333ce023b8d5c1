"""The import graph of the package folders, read with `ast` (nothing is imported):
- no module uses another module's private names (`from x import _name`, `x._name`); dunders are public;
- no import cycle among the modules of server/ and engine/ (imports inside functions count: a lazy
  import hides a cycle, it does not remove it);
- arrows point down (DESIGN.md): engine/ imports nothing of server/, export/, training/, bench/ and
  no torch; server/ imports nothing of export/, training/, bench/.

The checks are functions of {module name: source}, so the tests at the end can show that each one
finds what it is for.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nmt"  # setup.py installs each folder as nmt.<folder>
FOLDERS = ("engine", "server", "export", "training", "bench")
ACYCLIC = ("engine", "server")
LAYERS = {  # folder -> the modules (and everything below them) it must not import
    "engine": ("nmt.server", "nmt.export", "nmt.training", "nmt.bench", "torch"),
    "server": ("nmt.export", "nmt.training", "nmt.bench"),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (a submodule when `from pkg import sub` names one)
    name: str | None  # the name taken from it (`from target import name`); None: the module itself
    line: int


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_modules(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """Every module of the package folders: name -> (source, is a package's __init__)."""
    modules: dict[str, tuple[str, bool]] = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            package = parts[-1] == "__init__"
            name = ".".join((PACKAGE, *(parts[:-1] if package else parts)))
            modules[name] = (path.read_text(encoding="utf-8"), package)
    return modules


def _base(module: str, package: bool, node: ast.ImportFrom) -> str:
    """The module a `from ... import` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def imports(module: str, source: str, package: bool, known: set[str]) -> Iterator[Import]:
    """Every import statement of `module`, wherever it is (module level, functions, if blocks)."""
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, package, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield Import(module, submodule, None, node.lineno)
                else:
                    yield Import(module, base, alias.name, node.lineno)


def ours(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def bound_names(module: str, source: str, package: bool, known: set[str]) -> dict[str, str]:
    """Local name -> what it is bound to by an import of this package: `import nmt.x` binds nmt,
    `from .x import y as z` binds z to "nmt.<...>.x.y"."""
    bound: dict[str, str] = {}
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if ours(alias.name):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, package, node)
            if ours(base):
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return bound


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything but a chain of names."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else [*head, node.attr]
    return None


def private_uses(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """`from x import _name`, `import x._name` and `x._name` where x is another module of the package
    (or a name imported from one: `Class._name`), one line each: `module:line uses name of target`."""
    known = set(modules)
    found = []
    for module, (source, package) in modules.items():
        for imp in imports(module, source, package, known):
            if not ours(imp.target) or imp.target == module:
                continue
            if imp.name is not None and is_private(imp.name):
                found.append(f"{module}:{imp.line} imports {imp.name} from {imp.target}")
            hidden = [part for part in imp.target.split(".") if is_private(part)]
            if hidden and not module.startswith(imp.target.rsplit(".", 1)[0] + "."):
                found.append(f"{module}:{imp.line} imports the private module {imp.target}")
        bound = bound_names(module, source, package, known)
        for node in ast.walk(ast.parse(source, filename=module)):
            if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
                continue
            chain = _dotted(node.value)
            if chain is None or chain[0] not in bound:
                continue
            owner = ".".join([bound[chain[0]], *chain[1:]])  # nmt.engine.bundle, or nmt.engine.decoding.Decoder
            if owner != module and not owner.startswith(module + "."):
                found.append(f"{module}:{node.lineno} uses {node.attr} of {owner}")
    return found


def import_graph(modules: dict[str, tuple[str, bool]], folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules it imports, among the modules of `folders`."""
    inside = {m for m in modules if m.split(".")[1] in folders}
    graph: dict[str, set[str]] = {m: set() for m in sorted(inside)}
    for module in graph:
        source, package = modules[module]
        for imp in imports(module, source, package, set(modules)):
            if imp.target in inside and imp.target != module:
                graph[module].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A cycle (its modules, the first repeated at the end) for each back edge a depth-first search meets."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def layer_violations(modules: dict[str, tuple[str, bool]]) -> list[str]:
    """Imports against LAYERS: `module:line imports target`."""
    known = set(modules)
    found = []
    for module, (source, package) in modules.items():
        banned = LAYERS.get(module.split(".")[1], ())
        for imp in imports(module, source, package, known):
            target = imp.target if imp.name is None else f"{imp.target}.{imp.name}"
            if any(target == name or target.startswith(name + ".") for name in banned):
                found.append(f"{module}:{imp.line} imports {target}")
    return found


MODULES = read_modules()


def test_the_package_folders_are_read() -> None:
    assert {f"{PACKAGE}.{folder}" for folder in FOLDERS} <= set(MODULES)
    graph = import_graph(MODULES, ACYCLIC)
    assert "nmt.server.scheduler" in graph["nmt.server.continuous"]  # the subclass imports its base
    assert "nmt.engine.decoding" in graph["nmt.engine.continuous"]


def test_no_module_uses_another_modules_private_names() -> None:
    found = private_uses(MODULES)
    assert not found, "private names used outside their module (make them public, or move them):\n" + "\n".join(found)


def test_no_import_cycle_in_server_and_engine() -> None:
    found = cycles(import_graph(MODULES, ACYCLIC))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_imports_point_down() -> None:
    found = layer_violations(MODULES)
    assert not found, "imports against the layers (DESIGN.md):\n" + "\n".join(found)


def test_the_checks_find_what_they_are_for() -> None:
    fake = {
        "nmt.server": ("", True),
        "nmt.server.a": (
            "from .b import _Item, Public\nfrom . import b\nimport nmt.server.b as bee\n"
            "def f():\n    return b._helper, bee._other, Public._secret, b.__name__, _local\n"
            "_local = 1\n",
            False,
        ),
        "nmt.server.b": ("def g():\n    from .a import f\n", False),
        "nmt.engine": ("", True),
        "nmt.engine.c": ("import torch\nfrom nmt.server import a\nfrom nmt.training.model import Model\n", False),
    }
    assert private_uses(fake) == [
        "nmt.server.a:1 imports _Item from nmt.server.b",
        "nmt.server.a:5 uses _helper of nmt.server.b",
        "nmt.server.a:5 uses _other of nmt.server.b",
        "nmt.server.a:5 uses _secret of nmt.server.b.Public",
    ]
    assert cycles(import_graph(fake, ACYCLIC)) == [["nmt.server.a", "nmt.server.b", "nmt.server.a"]]
    assert layer_violations(fake) == [
        "nmt.engine.c:1 imports torch",
        "nmt.engine.c:2 imports nmt.server.a",
        "nmt.engine.c:3 imports nmt.training.model.Model",
    ]
