"""The package's layout rules, checked on the source (no import of dcp_train):

- imports point down (data/ imports nothing from checkpoint/): every module belongs to one layer of LAYERS (docs/design.md's module
  map, top to bottom) and imports only from its own layer or lower ones;
- no import circle among dcp_train's modules, imports inside functions included;
- no folder of dcp_train/ holds more than 15 modules;
- no module over 400 lines, no function over 80 lines.

A module's imports are every `import`/`from ... import` anywhere in it (ast.walk), resolved
to the dcp_train module they name: `from dcp_train.checkpoint import layout` is an import of
dcp_train.checkpoint.layout when that is a module, else of the package dcp_train.checkpoint.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dcp_train"
MAX_MODULES_PER_FOLDER = 15
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Top to bottom; a module's layer is the one of its longest matching prefix.
LAYERS = [
    ("entry", ["dcp_train.main", "dcp_train.cli", "dcp_train.ckpt", "dcp_train.sample",
               "dcp_train.plot", "dcp_train.hellaswag"]),
    ("tools", ["dcp_train.tools"]),
    ("trainer", ["dcp_train.train"]),
    ("checkpoint manager", ["dcp_train.checkpoint.manager"]),
    ("resume", ["dcp_train.checkpoint.resume"]),
    ("two tiers", ["dcp_train.checkpoint.tiers"]),
    ("async saves", ["dcp_train.checkpoint.async_save"]),
    ("save protocol", ["dcp_train.checkpoint.protocol"]),
    ("checkpoint view, load, resume rules", ["dcp_train.checkpoint.layout",
                                             "dcp_train.checkpoint.newer",
                                             "dcp_train.checkpoint.restore",
                                             "dcp_train.checkpoint.resume_rules"]),
    ("checkpoint state", ["dcp_train.checkpoint"]),  # state.py, rng.py, ride_out.py
    ("checkpoint format and DCP adapters", ["dcp_train.checkpoint.io"]),
    ("data", ["dcp_train.data"]),
    ("store", ["dcp_train.store"]),
    ("job services", ["dcp_train.job"]),
    ("model", ["dcp_train.model", "dcp_train.optim"]),
    ("distribution", ["dcp_train.distributed", "dcp_train.compiled", "dcp_train.torch_compat"]),
    ("config, errors", ["dcp_train.config", "dcp_train.errors", "dcp_train.redact",
                        "dcp_train"]),
]


def _modules() -> dict[str, Path]:
    """{dotted name: path} of every module under dcp_train/ (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement names (candidates: module or module.name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: from the module's package upward
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """{module: the dcp_train modules it imports}, imports inside functions included."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _imported(node, name, path.name == "__init__.py")
                deps.update(n for n in names if n in modules and n != name)
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS (0: top) of the longest prefix that names `module` or a package of it."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer of LAYERS"
    return index


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_counts_imports_inside_functions():
    graph = import_graph()
    # main imports the training loop inside main() only (so that --help stays instant)
    assert "dcp_train.train.loop" in graph["dcp_train.main"]
    assert "dcp_train.errors" in graph["dcp_train.config"]


def test_imports_point_down():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} "
              f"({LAYERS[layer_of(dep)][0]})"
              for module, deps in import_graph().items() for dep in sorted(deps)
              if layer_of(dep) < layer_of(module)]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_crowded_folder():
    per_folder = defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        per_folder[path.parent.relative_to(PACKAGE.parent)].append(path.name)
    crowded = {str(k): len(v) for k, v in per_folder.items() if len(v) > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"folders with more than {MAX_MODULES_PER_FOLDER} modules: {crowded}"


def test_no_long_module():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_long_function():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(PACKAGE.parent)}:{node.name}"
                if lines > MAX_FUNCTION_LINES:
                    long[name] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_data_imports_nothing_from_checkpoint():
    """data/ sits below checkpoint/: a data module needs the store layer, never a checkpoint."""
    graph = import_graph()
    up = [f"{m} imports {d}" for m, deps in graph.items() if m.startswith("dcp_train.data")
          for d in sorted(deps) if d.startswith("dcp_train.checkpoint")]
    assert not up, "data/ imports checkpoint/:\n" + "\n".join(up)
