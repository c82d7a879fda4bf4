"""Imports run one way: a module imports only from its own layer or the layers below (docs/architecture.md).

The check parses every module of the package with ``ast`` (nothing is imported, so it takes well under a
second) and reads every ``import`` / ``from ... import`` of a cwhawq module, at module level or inside
a function: a function-local import cannot hide an upward import or a cycle. It fails when

- a module imports from a layer above its own,
- the modules' import graph has a cycle (a package's ``__init__`` importing its own submodules is its
  facade and is not counted; the submodules importing back from the package is),
- a module is in no layer (a new module gets a line in ``LAYERS`` and in docs/architecture.md).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cwhawq"

# bottom (0) to top; a name covers the module or package of that name and everything under it, the
# longest name wins (``cwhawq.zoo.train`` is the training script, above everything it trains with)
LAYERS: list[tuple[str, ...]] = [
    ("cwhawq", "cwhawq.errors", "cwhawq.io", "cwhawq.dist", "cwhawq.quantizers", "cwhawq.onnx_graph",
     "cwhawq.kernels", "cwhawq.zoo"),                                      # 0 foundations, kernels, zoo nets
    ("cwhawq.data", "cwhawq.models", "cwhawq.plan"),                      # 1 data, model specs, the plan
    ("cwhawq.graph", "cwhawq.evaluate", "cwhawq.onnx_plan"),              # 2 layers of a model; accuracy
    ("cwhawq.hessian", "cwhawq.quantize", "cwhawq.rounding"),             # 3 sensitivity; simulation; learned rounding
    ("cwhawq.checks", "cwhawq.baselines"),                                # 4 input checks; baseline planners
    ("cwhawq.simulate",),                                                 # 5 calibration + simulate a plan
    ("cwhawq.search", "cwhawq.export", "cwhawq.backends"),                # 6 search; ONNX export; TVM
    ("cwhawq.bench",),                                                    # 7 timing artifacts
    ("cwhawq.latency",),                                                  # 8 latency tables
    ("cwhawq.api",),                                                      # 9 the Python API
    ("cwhawq.demo",),                                                     # 10 the whole pipeline
    ("cwhawq.cli", "cwhawq.__main__", "cwhawq.zoo.train"),                # 11 commands, scripts
]


# import edges that close a cycle and are known, each with the reason it stays (none today: the
# kernels' three were removed by moving ``concat``/``digit_expr`` into core and cuda into isa/)
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(mod: str) -> int | None:
    best, layer = -1, None
    for k, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > best:
                best, layer = len(n), k
    return layer


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported cwhawq module, line) for every import statement in the file, wherever it is."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "cwhawq"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cwhawq":
                continue
            for a in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{target}.{a.name}"
                out.append((sub if sub in modules else target, node.lineno))
    return out


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    graph = {}
    for mod, path in modules.items():
        edges = []
        for tgt, line in imports_of(mod, path, modules):
            if tgt == mod or tgt.startswith(mod + "."):   # a package's facade over its submodules
                continue
            edges.append((tgt, line))
        graph[mod] = edges
    return graph


def test_every_module_has_a_layer():
    missing = [m for m in all_modules() if layer_of(m) is None]
    assert not missing, f"modules in no layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_imports_go_down():
    modules = all_modules()
    bad = []
    for mod, edges in import_graph().items():
        here = layer_of(mod)
        for tgt, line in edges:
            there = layer_of(tgt)
            if tgt not in modules:
                bad.append(f"{modules[mod].relative_to(ROOT.parent)}:{line}: {mod} imports {tgt}, which does not exist")
            elif here is not None and there is not None and there > here:
                bad.append(f"{modules[mod].relative_to(ROOT.parent)}:{line}: {mod} (layer {here}) imports {tgt} "
                           f"(layer {there}, above it)")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of the directed graph (as a path that ends where it starts), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(u):
        color[u] = GREY
        stack.append(u)
        for v in graph.get(u, ()):
            if color.get(v, BLACK) == GREY:
                return stack[stack.index(v):] + [v]
            if color.get(v) == WHITE:
                c = visit(v)
                if c:
                    return c
        stack.pop()
        color[u] = BLACK
        return None

    for u in graph:
        if color[u] == WHITE:
            c = visit(u)
            if c:
                return c
    return None


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in edges if (m, t) not in KNOWN_CYCLE_EDGES}) for m, edges in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cyclic", [({"a": ["b"], "b": ["c"], "c": []}, False),
                                           ({"a": ["b"], "b": ["c"], "c": ["a"]}, True),
                                           ({"a": ["a"]}, True)])
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from . import data as D\n\ndef f():\n    from .api import search\n    from ..plan import Plan\n")
    modules = {"cwhawq.search.x": src, "cwhawq.search.data": src, "cwhawq.api": src, "cwhawq.plan": src}
    got = [t for t, _ in imports_of("cwhawq.search.x", src, modules)]
    assert got == ["cwhawq.search.data", "cwhawq.search.api", "cwhawq.plan"]
    assert layer_of("cwhawq.api") > layer_of("cwhawq.search.x") > layer_of("cwhawq.plan")


def test_the_cli_imports_without_torch():
    """``cwhawq --help``, ``bench`` and ``run`` need neither torch nor TVM: importing the CLI loads neither
    (stages that need them import them inside the command)."""
    import subprocess
    import sys

    code = "import sys, cwhawq.cli; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
