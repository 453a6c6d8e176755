"""The package's layering, enforced: which package may import which, and where Ray may be imported.

labels, config -> data -> model -> evaluation -> train -> tune; serve depends on data, model and evaluation
only (a served model never imports training code or Ray Tune); Ray is imported only by the thin adapters.
"""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "platform"
pytestmark = pytest.mark.timeout(60)

# package (first part of the module path below ctplatform) -> packages it may import
BASE = {"labels", "config", "atomic", "storage", "heap"}
ALLOWED = {
    "labels": set(),
    "atomic": set(),
    "heap": set(),
    "storage": {"atomic"},
    "staging": {"storage"},
    "config": {"labels", "storage"},
    "data": BASE | {"data", "ray_session"},
    "model": BASE | {"data", "model"},
    "evaluation": BASE | {"data", "model", "evaluation"},
    "train": BASE | {"data", "model", "evaluation", "train", "ray_session"},
    "tune": BASE | {"data", "model", "evaluation", "train", "tune", "ray_session"},
    "serve": BASE | {"data", "model", "evaluation", "serve", "ray_session"},
    "ray_session": BASE,
}
# the application's entry points wire everything together
ENTRY_POINTS = {"cli", "demo"}
# the only modules that may import Ray (thin adapters)
RAY_ADAPTERS = {"ray_session", "data/prepare_ray", "train/ray_launcher", "tune", "serve"}


def _modules():
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE).with_suffix("")
        yield "/".join(relative.parts), path


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Modules `path` imports: everywhere (lazy imports in functions too), or only when it is imported."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_packages_import_only_the_layers_below_them():
    broken = []
    for name, path in _modules():
        package = name.split("/")[0]
        if package in ENTRY_POINTS:
            continue
        assert package in ALLOWED, f"platform/{name}.py: package {package!r} has no place in the layering"
        for imported in _imports(path):
            if imported.startswith("ctplatform."):
                target = imported.split(".")[1]
                if target not in ALLOWED[package] and target != package:
                    broken.append(f"platform/{name}.py imports {imported}")
    assert not broken, "\n".join(broken)


def test_ray_is_imported_only_by_the_adapters():
    offenders = [f"platform/{name}.py" for name, path in _modules()
                 if any(i == "ray" or i.startswith("ray.") for i in _imports(path))
                 and not any(name == a or name.startswith(a + "/") for a in RAY_ADAPTERS)
                 and name.split("/")[0] not in ENTRY_POINTS]
    assert not offenders, offenders


def test_serve_never_imports_lightning_or_tune():
    for name, path in _modules():
        if name.startswith("serve/"):
            imported = _imports(path)
            assert not any(i.split(".")[0] in ("lightning", "pytorch_lightning") for i in imported), name
            assert not any(i.startswith("ray.tune") or i.startswith("ray.train") for i in imported), name


def test_no_import_cycle_between_modules():
    """Module-level imports only: a function's lazy import runs after every module has loaded."""
    graph = {}
    for name, path in _modules():
        module = "ctplatform." + name.replace("/", ".").removesuffix(".__init__")
        graph[module] = {i for i in _imports(path, top_level_only=True) if i.startswith("ctplatform.")}
    # an import of a package means its __init__
    known = set(graph)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in known or target == node:
                continue
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, target]))
            if target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_every_module_is_at_most_400_lines():
    long = {f"platform/{name}.py": n for name, path in _modules() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
