"""The package's layers read one way, core <- zoo <- {pipeline, bench} <- studies <- cli: no module imports a
higher layer, and no modules import each other in a circle. Every import counts, those inside
functions too (a deferred import is still a dependency). The benchmarks time the zoo's models, and
the scaling study records its machine as they do (bench.common); the pipeline splits the zoo's models
and runs the zoo's training loop stage by stage."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dfa_kernels"
# the higher layers; every other module of the package is the core
LAYERS = {"zoo": 1, "pipeline": 2, "bench": 2, "studies": 3, "cli": 4, "__main__": 4}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("dfa_kernels",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules) -> set[str]:
    """The package's modules that `name` imports (a package's __init__ for `import dfa_kernels`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub; `from mod import name`, the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a))
    assert upward == []


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_graph_sees_imports():
    """The scan itself: the edges this test relies on are found (a broken scan would pass vacuously)."""
    graph = _graph()
    assert "dfa_kernels.ops" in graph["dfa_kernels.nn"]  # from . import ops
    assert "dfa_kernels.feedback" in graph["dfa_kernels.ops"]  # from .feedback import FeedbackSpec
    assert "dfa_kernels.zoo.training" in graph["dfa_kernels.studies.alignment"]  # from ..zoo.training import
    assert "dfa_kernels" in graph["dfa_kernels.zoo.trainer"]  # import dfa_kernels as dk
    assert _layer("dfa_kernels.zoo.recipes.graph") == 1 and _layer("dfa_kernels.align") == 0
