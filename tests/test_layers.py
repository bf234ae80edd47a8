"""The package's house (docs/development.md): every module sits in one layer, imports only point down the layers (a
module may use its own layer's and any lower layer's), module-level imports make no cycle, and a file over 300 lines
says why in its docstring. Imports are read from the source (ast), inside functions too."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distq"
LAYERS = ("setup", "problems", "maths", "algorithms", "runs", "backends", "training", "edges")
"""Lowest first. distq/errors.py is below them all."""
MAX_LINES = 300


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    parts = module.split(".")
    if module in ("distq", "distq.errors"):
        return -1
    assert len(parts) >= 2 and parts[1] in LAYERS, f"{module} is in no layer of {LAYERS}"
    return LAYERS.index(parts[1])


def imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every `import distq...` / `from distq... import` in the file (`from distq.x import y` names
    the module distq.x.y when that is one)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found, known = [], modules()
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("distq")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distq"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append((node.lineno, name if name in known else node.module))
    return found


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down_the_layers(module):
    path = modules()[module]
    upward = [f"{path.name}:{line} imports {target}" for line, target in imports(path) if rank(target) > rank(module)]
    assert not upward, f"{module} ({LAYERS[rank(module)] if rank(module) >= 0 else 'base'}) reaches up: {upward}"


def test_module_level_imports_make_no_cycle():
    graph = {module: {target for _, target in imports(path, top_level_only=True)} for module, path in modules().items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*trail, module, target])}"
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_a_long_file_says_why():
    long = {path.relative_to(PACKAGE.parent): len(path.read_text().splitlines()) for path in modules().values()}
    unexplained = [f"{path} ({lines} lines)" for path, lines in long.items() if lines > MAX_LINES
                   and f"Over {MAX_LINES} lines" not in (ast.get_docstring(ast.parse((PACKAGE.parent / path).read_text())) or "")]
    assert not unexplained, f"say why in the docstring ('Over {MAX_LINES} lines: ...'): {unexplained}"


def test_every_layer_says_what_it_holds():
    for layer in LAYERS:
        assert ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())), layer
