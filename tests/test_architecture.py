"""The three layers hold: the method (layer 1) imports neither Ray nor MLflow, no module imports its way
back to itself, and the fast paths stay fast (`limpq search` on a cached cost table, the dataset checks)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"
# Layer 1, the method in plain torch/PuLP, with the config and the shared plumbing every layer uses.
LAYER_ONE = ("orchestrator.quant", "orchestrator.search", "orchestrator.train", "orchestrator.data",
             "orchestrator.models", "orchestrator.checks", "orchestrator.config", "orchestrator.common")
# Layer 2, cut by job: MLflow work (tracking), Ray work (distributed), and the one module of library internals.
LAYER_TWO = ("orchestrator.tracking", "orchestrator.distributed", "orchestrator.compat")
# Layer 3, the entry points.
LAYER_THREE = ("orchestrator.cli",)
ORCHESTRATION = ("ray", "mlflow")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (relative imports resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _own_graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(imported: str) -> str | None:
        while imported and imported not in modules:
            imported = imported.rpartition(".")[0]
        return imported or None

    return {name: {target for target in map(owner, _imports(name, path)) if target and target != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def test_no_module_imports_its_way_back_to_itself() -> None:
    assert _cycles(_own_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _layer(module: str) -> int:
    for number, layer in enumerate((LAYER_ONE, LAYER_TWO, LAYER_THREE), start=1):
        if module.startswith(layer):
            return number
    raise AssertionError(f"{module} belongs to no layer: add it to one in tests/test_architecture.py")


def test_every_module_belongs_to_a_layer_and_imports_none_above_it() -> None:
    upward = sorted(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
                    for module, targets in _own_graph().items() for target in targets
                    if "orchestrator" not in (module, target) and _layer(target) > _layer(module))
    assert upward == []


def test_tracking_does_not_import_distributed() -> None:
    """MLflow work stands without Ray work: tracking/ never reaches into distributed/."""
    graph = _own_graph()
    assert sorted(f"{module} -> {target}" for module, targets in graph.items() if module.startswith("orchestrator.tracking")
                  for target in targets if target.startswith("orchestrator.distributed")) == []


def test_the_package_root_holds_folders_and_at_most_three_modules() -> None:
    loose = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert len(loose) <= 3, loose


def test_method_layer_never_imports_ray_or_mlflow() -> None:
    """Read from the source, so an import inside a function counts too."""
    offending = {}
    for name, path in _modules().items():
        if name.startswith(LAYER_ONE):
            bad = sorted(imported for imported in _imports(name, path) if imported.split(".")[0] in ORCHESTRATION)
            if bad:
                offending[name] = bad
    assert offending == {}


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_method_layer_loads_without_ray_or_mlflow() -> None:
    modules = [name for name in _modules() if name.startswith(LAYER_ONE)]
    loaded = _loaded_after("\n".join(f"import {module}" for module in modules))
    assert not set(ORCHESTRATION) & loaded


def test_tracking_loads_without_ray() -> None:
    """MLflow work, compat's MLflow helpers included, runs in processes that never start Ray (`limpq
    export`, a look at finished runs): compat imports Ray's internals inside its Ray functions."""
    modules = [name for name in _modules() if name.startswith(("orchestrator.tracking", "orchestrator.compat"))]
    assert "ray" not in _loaded_after("\n".join(f"import {module}" for module in modules))


def test_dataset_checks_do_not_import_torch() -> None:
    """The preflight checks run before every entry point: listing and footers only."""
    loaded = _loaded_after("import orchestrator.data.layout, orchestrator.data.storage, orchestrator.data.convert")
    assert not {"torch", "ray", "mlflow"} & loaded


def test_the_cli_and_a_search_with_a_cached_cost_table_do_not_import_torch() -> None:
    loaded = _loaded_after("import orchestrator.cli; orchestrator.cli.build_parser(); import orchestrator.search.ilp")
    assert not {"torch", "ray", "mlflow"} & loaded


def test_a_ray_worker_imports_the_runtime_module_under_our_ray_data_logging() -> None:
    """Every Ray worker imports `orchestrator.distributed.runtime` (its set-up hook) with
    RAY_DATA_LOGGING_CONFIG set, and Ray Data applies that config while it is being imported: the filter
    it names must not live in a module that imports ray.data, or the import comes back to a half-made
    module and every worker exits at start."""
    config = PACKAGE / "distributed" / "ray_data_logging.yaml"
    result = subprocess.run([sys.executable, "-c", "import orchestrator.distributed.runtime"], capture_output=True,
                            text=True, env={**os.environ, "RAY_DATA_LOGGING_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr[-2000:]
