"""The package's layout: layers that import only downward, no import cycle, and a docstring for every folder."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ipu_trainer")
# Bottom to top: a module may import its own layer and the layers before it, never one after it. A module
# directly in the package (an entry point, `python -m ipu_trainer.plot`) sits above every layer.
LAYERS = ["config", "models", "run", "data", "training", "cli"]


def modules() -> dict[str, str]:
    """Dotted module name (without the package) -> file path, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__").removesuffix("__init__")] = path
    return found


def imports_of(dotted: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that `dotted` imports, anywhere in its file (function-level imports included)."""
    package = dotted.split(".")[:-1] if not path.endswith("__init__.py") else dotted.split(".") if dotted else []
    imported = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
        elif (node.module or "").startswith("ipu_trainer"):
            base = []
        else:
            continue
        module = [part for part in (node.module or "").split(".") if part and part != "ipu_trainer"] if node.module else []
        target = ".".join(base + module)
        for alias in node.names:  # `from . import hub` imports a module
            candidate = f"{target}.{alias.name}" if target else alias.name
            imported.add(candidate if candidate in known else target)
    return {name for name in imported if name in known and name != dotted}


def is_entry_point(dotted: str, path: str) -> bool:
    return "." not in dotted and os.path.dirname(path) == PACKAGE


def layer_of(dotted: str) -> int:
    top = dotted.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    found = modules()
    upward = []
    for dotted, path in found.items():
        if dotted == "":
            continue  # the package's own __init__ gathers the public names
        assert dotted.split(".")[0] in LAYERS or is_entry_point(dotted, path), (
            f"{path} is in no layer folder ({', '.join(LAYERS)})")
        for target in imports_of(dotted, path, set(found)):
            if target and layer_of(target) > layer_of(dotted):
                upward.append(f"{dotted} imports {target}")
    assert not upward, "upward imports: " + "; ".join(sorted(upward))


def test_no_import_cycle():
    found = modules()
    graph = {dotted: imports_of(dotted, path, set(found)) - {""} for dotted, path in found.items() if dotted}
    visiting, done = set(), set()

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        visiting.add(node)
        for target in sorted(graph.get(node, ())):
            # a folder's __init__ importing its own modules is not a cycle with them
            if not (target.startswith(node + ".") or node.startswith(target + ".") and target == node.split(".")[0]):
                visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.parametrize("layer", LAYERS)
def test_each_folder_says_in_two_lines_what_lives_there(layer):
    docstring = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, layer, "__init__.py")).read()))
    assert docstring and len(docstring.splitlines()) <= 2, layer
