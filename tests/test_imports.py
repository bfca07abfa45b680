"""The package's module structure: every module imports on its own, and finsight modules import each other
without a cycle (a cycle works only by the order modules happen to load in, or by hiding imports in
functions)."""

from __future__ import annotations

import ast
import importlib
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finsight"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def finsight_imports(path: Path, known: set[str]) -> set[str]:
    """The finsight modules a file imports, wherever the import statement is (module level or in a function).

    A package's ``__init__`` counts with its module-level imports only: its lazy ``__getattr__`` (``from
    finsight import FinSightModule``) runs on attribute access, never while a submodule is being imported.
    """
    tree = ast.parse(path.read_text())
    nodes = tree.body if path.name == "__init__.py" else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from finsight.data import quality` imports the module finsight.data.quality.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(MODULES)
    graph = {module_name(p): finsight_imports(p, known) for p in PACKAGE.rglob("*.py")}
    for name in graph:
        graph[name].discard(name)
    return graph


def test_finsight_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"finsight.training.module", "finsight.evaluation.metrics", "finsight.evaluation.samples", "finsight.data.datamodule"} <= set(graph)
    assert "finsight.evaluation.metrics" in graph["finsight.evaluation.samples"]  # the graph sees real edges
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle between finsight modules: {' -> '.join(error.args[1])}")
    assert set(order) == set(graph)


# What each folder may not import, directly or through another module: the layers point one way, data → model →
# training → evaluation/export → cli, with inference beside training (it generates without Lightning).
LAYERS = {
    "data": {"model", "training", "inference", "evaluation", "export", "cli"},
    "model": {"training", "inference", "evaluation", "export", "cli"},
    "inference": {"training", "evaluation", "export", "cli"},
    "training": {"inference", "evaluation", "export", "cli"},
    "compat": {"data", "model", "training", "inference", "evaluation", "export", "cli"},
}


def folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def reached_from(graph: dict[str, set[str]], start: str) -> set[str]:
    reached, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    return reached - {start}


def test_the_layers_import_one_way():
    graph = import_graph()
    broken = sorted(f"{name} -> {dep}" for name in graph if folder(name) in LAYERS
                    for dep in reached_from(graph, name) if folder(dep) in LAYERS[folder(name)])
    assert broken == []
    # The check sees real edges: training reaches the model loader, evaluation the data package.
    assert "finsight.model.loading" in reached_from(graph, "finsight.training.module")
    assert "finsight.data.chat" in reached_from(graph, "finsight.evaluation.held_out")


def test_inference_loads_no_lightning():
    # The chat and export run on the inference modules alone: Lightning and torchmetrics (seconds of imports)
    # stay out of them.
    import subprocess
    import sys

    names = sorted(name for name in MODULES if folder(name) == "inference")
    code = (f"import sys; import {', '.join(names)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'lightning', 'torchmetrics'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(names) >= 3 and result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", [name for name in MODULES if name != "finsight.__main__"])  # that one runs
def test_every_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no docstring saying what it owns"


def test_the_chat_starts_without_the_training_stack():
    # `finsight chat` only generates: Lightning and torchmetrics (seconds of imports) must stay out of it.
    import subprocess
    import sys

    code = ("import sys; import finsight.cli.chat; "
            "print(sorted({'lightning', 'torchmetrics', 'finsight.training.module', 'finsight.cli.lightning_cli'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
