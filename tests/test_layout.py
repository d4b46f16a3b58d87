"""The package's import graph: no cycles, and no module imports from a layer above its own.

    python -m pytest tests/test_layout.py -q

Layers, bottom to top: the root's shared types, `model`, `drafting`, `policy`, `engine`, `serving`,
`tools`. Imports inside functions count as much as those at the top of a file.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "backend" / "minedraft"
LAYERS = ["", "model", "drafting", "policy", "engine", "serving", "tools"]  # "": the root's modules


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The minedraft modules a file imports (a package's name where it imports the package itself)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "minedraft")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "minedraft":
                continue
            for alias in node.names:  # `from pkg import module` names a module; `from module import x` does not
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found


def layer_of(module: str) -> int:
    parts = module.split(".")
    folder = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(folder)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def test_every_folder_says_what_it_owns():
    for folder in LAYERS[1:]:
        init = PACKAGE / folder / "__init__.py"
        assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), f"{folder}/__init__.py needs a docstring"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "minedraft"))
def test_no_module_imports_from_a_layer_above_its_own(module):
    upward = sorted(m for m in GRAPH[module] if layer_of(m) > layer_of(module))
    assert not upward, f"{module} (layer {LAYERS[layer_of(module)] or 'root'}) imports {upward}"


def test_the_import_graph_has_no_cycles():
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            pytest.fail("import cycle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
        if module in done:
            return
        on_path.append(module)
        for imported in sorted(GRAPH[module]):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
