"""The package's layering, read from the source with `ast`: imports run only downward, and no circles.

Each layer of drpt_ref (a subpackage, or the top-level modules flags.py and cli.py) states in its docstring
which layers it may import, on a line `May import: a, b, c.`. This test reads every module's imports (at
the top and inside functions, `from drpt_ref import x`, relative imports, and module paths given to
importlib as strings) and fails on
    - an import of a layer the importer does not list (an upward or sideways import),
    - a circle among the stated layer rules (then "downward" would mean nothing),
    - a circle among modules, inside a layer or across layers,
    - a module inside the package importing the package root (`from drpt_ref import project`): the root
      re-exports the public API and sits above every layer,
    - a subpackage whose one-line purpose is missing from the root docstring (what `help(drpt_ref)` shows).
"""

from __future__ import annotations

import ast
import pathlib
import re

import drpt_ref

PKG = pathlib.Path(drpt_ref.__file__).parent
ROOT = "drpt_ref"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(module: str) -> str:
    """drpt_ref.core.project -> core; drpt_ref.flags -> flags; drpt_ref -> the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def resolve(name: str) -> str | None:
    """The drpt_ref module an import names (a name inside a module resolves to that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != ROOT:
                continue
            for alias in node.names:  # `from drpt_ref.core import project` imports a module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"drpt_ref(\.\w+)+", node.value) and node.value in MODULES:
                found.add(node.value)  # importlib.import_module("drpt_ref.experiments.bench.solvers")
    return {m for m in (resolve(f) for f in found) if m and m != module}


def stated_rules() -> dict[str, set[str]]:
    """layer -> the layers its docstring says it may import."""
    rules = {}
    for module, path in MODULES.items():
        if module == ROOT or module.count(".") != 1:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        match = re.search(r"^May import: (.*?)\.?$", doc, re.M)
        assert match, f"{path}: the docstring has no 'May import: ...' line"
        text = match.group(1)
        rules[layer_of(module)] = set() if text.startswith("nothing") else {x.strip() for x in text.split(",")}
    return rules


def graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(u):
        colour[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if colour.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in colour and (c := visit(v)):
                return c
        colour[u] = 2
        stack.pop()
        return None

    for u in sorted(edges):
        if u not in colour and (c := visit(u)):
            return c
    return None


def test_every_layer_states_its_rule_and_the_rules_run_one_way():
    rules = stated_rules()
    layers = {layer_of(m) for m in MODULES} - {ROOT}
    assert set(rules) == layers, f"layers without a stated rule: {layers - set(rules)}"
    for layer, allowed in rules.items():
        assert allowed <= layers, f"{layer} names unknown layers {allowed - layers}"
    assert find_cycle(rules) is None, f"the stated layer rules form a circle: {find_cycle(rules)}"


def test_imports_run_only_downward():
    rules = stated_rules()
    bad = []
    for module, deps in graph().items():
        src = layer_of(module)
        for dep in deps:
            dst = layer_of(dep)
            if dst == ROOT and src != ROOT:
                bad.append(f"{module} imports the package root {dep} (import from the defining module)")
            elif src not in (ROOT, dst) and dst not in rules[src]:
                bad.append(f"{module} ({src}) imports {dep} ({dst}); {src} may import only {sorted(rules[src])}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_circle_among_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_help_lists_every_subpackage_with_its_purpose():
    doc = drpt_ref.__doc__
    for module, path in MODULES.items():
        if module.count(".") == 1 and path.name == "__init__.py":
            first = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()[0]
            purpose = first.rstrip(".")[0].lower() + first.rstrip(".")[1:]
            assert re.search(rf"^\s+{layer_of(module)}\s+{re.escape(purpose)}$", doc, re.M), (
                f"drpt_ref's docstring should list `{layer_of(module)}  {purpose}`")

