"""No import cycle inside yarn_vllm, counting imports made inside functions (issue 11).

A cycle hidden in a function-level import works until someone moves the import up; the
graph below has an edge for every `import` statement anywhere in a module.
"""

from __future__ import annotations

import ast
import graphlib
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "yarn_vllm"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _owner(name: str, modules) -> str | None:
    """The module `name` is, or the package module it lies inside (`a.b.f` -> `a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.id for node in tree.body for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{prefix}.{base}" if base else prefix
                # `from pkg import x`: the submodule pkg.x, else a name of pkg; a compiled
                # submodule (yarn_vllm._C) is neither and stays outside the graph
                names = [f"{base}.{a.name}" for a in node.names
                         if f"{base}.{a.name}" in modules or base not in modules
                         or modules[base].name != "__init__.py"
                         or a.name in _top_level_names(modules[base])]
            else:
                continue
            graph[module] |= {o for n in names if (o := _owner(n, modules)) not in (None, module)}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 80  # the walk saw the package
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert set(order) == set(graph)


def test_the_check_catches_a_cycle_through_a_function_level_import():
    graph = import_graph()
    assert "yarn_vllm.yarn.yarn_math" in graph["yarn_vllm.yarn.scale_policy"]
    graph["yarn_vllm.yarn.yarn_math"] = graph["yarn_vllm.yarn.yarn_math"] | {"yarn_vllm.yarn.scale_policy"}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("yarn_math -> scale_policy -> yarn_math is a cycle the check missed")


LIBRARY = ("yarn_vllm.yarn", "yarn_vllm.vllm_seam", "yarn_vllm.attention", "yarn_vllm.ops",
           "yarn_vllm.errors")


def _external_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layering_violations(graph=None, modules=None) -> list[str]:
    """The layers of docs/architecture.md: the YaRN maths and settings import no vLLM (and
    nothing of ours outside them but errors); the library imports no tool."""
    graph = import_graph() if graph is None else graph
    modules = _modules() if modules is None else modules
    bad = []
    for module, path in modules.items():
        if _in(module, ("yarn_vllm.yarn",)):
            if "vllm" in _external_imports(path):
                bad.append(f"{module} imports vllm")
            bad += [f"{module} imports {o}" for o in graph[module]
                    if not _in(o, ("yarn_vllm.yarn", "yarn_vllm.errors"))]
        if _in(module, LIBRARY):
            bad += [f"{module} imports {o}" for o in graph[module] if _in(o, ("yarn_vllm.tools",))]
    return bad


def test_the_layers_hold():
    assert layering_violations() == []


def test_the_layering_check_catches_a_library_module_importing_a_tool():
    graph = import_graph()
    graph["yarn_vllm.vllm_seam.admission"] = graph["yarn_vllm.vllm_seam.admission"] | {
        "yarn_vllm.tools.methods"}
    graph["yarn_vllm.yarn.scale_policy"] = graph["yarn_vllm.yarn.scale_policy"] | {
        "yarn_vllm.vllm_seam.plugin"}
    assert sorted(layering_violations(graph)) == [
        "yarn_vllm.vllm_seam.admission imports yarn_vllm.tools.methods",
        "yarn_vllm.yarn.scale_policy imports yarn_vllm.vllm_seam.plugin"]
