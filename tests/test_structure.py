"""The repository's import structure (issue 21): train.py is the top, nothing beneath it imports it back (only the
scripts, benchmarks and tests that drive it do), and no modules import each other in a cycle. The imports are read with
ast, at module level and inside functions, so a lazy import counts as much as one at the top."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "data", "eval", "families", "scripts", "tests", "tiny")
MAY_IMPORT_TRAIN = ("scripts", "benchmarks", "tests")  # what drives train.py from outside; nothing it uses


def repository_modules() -> dict[str, Path]:
    """{dotted module name: file} for the top-level .py files and the packages' modules."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def resolve(name: str, modules: dict) -> str | None:
    """The repository module that importing `name` loads (its longest known prefix), or None for a library."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, path: Path, modules: dict) -> set[str]:
    """The repository modules that `module` imports anywhere in its file. tests/ and scripts/ put their own folder
    on sys.path (conftest, `python scripts/x.py`), so `import test_train` is tests.test_train there."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            names = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        for name in names:
            target = resolve(name, modules)
            if target is None and package in ("tests", "scripts"):
                target = resolve(f"{package}.{name}", modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = repository_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each one cycle or more."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_nothing_beneath_train_imports_it():
    importers = sorted(module for module, targets in import_graph().items()
                       if "train" in targets and module.split(".")[0] not in MAY_IMPORT_TRAIN)
    assert importers == [], f"{importers} import train.py: move what they need beneath it (data/, families/, ...)"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_walker_sees_lazy_relative_and_cyclic_imports(tmp_path):
    """The checks above can fail: a function-level import of train, a relative import and a cycle are all found."""
    path = tmp_path / "__init__.py"
    path.write_text("def f():\n    import train\nfrom . import noise\nfrom .video import Wan\n")
    assert imports_of("families", path, repository_modules()) == {"train", "families.noise", "families.video"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
