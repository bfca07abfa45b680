"""Outside ``finsight/compat/``, finsight uses only the public API of the libraries whose internals it knows.

Reads every finsight module (no import needed) for what would break silently on a library's next release:
a private attribute finsight did not define (``trainer._x``, ``getattr(obj, "_x")``), an import of a private
name or of a module outside the public ones listed here, an assignment onto another library's module (a
monkeypatch), and (importing the classes) a finsight method that overrides a third-party base's private
method. ``finsight/compat/`` is where each such use lives, named, with the version range it was read on.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "finsight"
COMPAT = PACKAGE / "compat"

LIBRARIES = ("lightning", "transformers", "peft", "bitsandbytes", "deepspeed", "torchdata", "torchmetrics")
"""Libraries whose internals finsight reads; torch is public enough that only its private names are checked."""

PUBLIC_MODULES = {
    "lightning", "lightning.pytorch", "lightning.pytorch.callbacks", "lightning.pytorch.loggers",
    "lightning.pytorch.cli", "lightning.pytorch.strategies", "lightning.pytorch.plugins",
    "lightning.pytorch.plugins.io", "lightning.pytorch.accelerators", "lightning.pytorch.utilities",
    "lightning.pytorch.utilities.rank_zero", "lightning.pytorch.utilities.types", "lightning.fabric.plugins",
    "lightning.pytorch.utilities.deepspeed",  # convert_zero_checkpoint_to_fp32_state_dict, in the DeepSpeed guide
    "transformers", "transformers.utils", "peft", "peft.tuners.lora", "bitsandbytes", "bitsandbytes.functional",
    "bitsandbytes.nn", "deepspeed", "deepspeed.ops.adam", "deepspeed.utils", "deepspeed.accelerator",
    "torchdata.stateful_dataloader", "torchmetrics", "torchmetrics.aggregation", "torchmetrics.text",
    "torchmetrics.functional.text",
}
"""Modules the libraries document as their API (the rest is internal and goes through ``compat``)."""


def package_files(outside_compat: bool = True) -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not (outside_compat and COMPAT in p.parents))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_private_names(path: Path) -> set[str]:
    """The private names a file defines itself: functions, classes, attributes and variables it assigns.

    Per file: a name another finsight module defines does not make the same name on a library's object
    finsight's (a callback's own ``self._trainer`` says nothing about ``LightningModule._trainer``).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {name for name in names if is_private(name)}


def third_party_module_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> module, for every ``import lib`` / ``import lib.sub as x`` of a checked library."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name
    return bound


def violations_in(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text())
    own = own_private_names(path)
    where = path.relative_to(root)
    modules = third_party_module_names(tree)
    found = []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own:
            found.append(f"{line}: private attribute .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in {"getattr", "hasattr", "setattr", "delattr"} and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value) and node.args[1].value not in own):
            found.append(f"{line}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            library = node.module.split(".")[0]
            if library in LIBRARIES and node.module not in PUBLIC_MODULES:
                found.append(f"{line}: internal module {node.module}")
            private = [alias.name for alias in node.names if is_private(alias.name)]
            if private and library != "finsight":
                found.append(f"{line}: private name {private} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES and alias.name not in PUBLIC_MODULES:
                    found.append(f"{line}: internal module {alias.name}")
        elif isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id in modules):
                    found.append(f"{line}: monkeypatch of {modules[target.value.id]}.{target.attr}")
    return found


def private_overrides_in(cls: type) -> list[str]:
    """Methods ``cls`` itself defines under the name of a private method of a third-party class it inherits."""
    # Functions written in the class body (a metaclass's generated attributes, such as autograd's, are not).
    methods = {name for name, value in vars(cls).items() if is_private(name)
               and getattr(getattr(value, "__func__", value), "__qualname__", None) == f"{cls.__qualname__}.{name}"}
    return [f"{cls.__module__}.{cls.__qualname__}.{name} overrides {base.__module__}.{base.__qualname__}.{name}"
            for base in inspect.getmro(cls)[1:] if base.__module__.split(".")[0] != "finsight"
            for name in sorted(methods & set(vars(base)))]


def private_overrides() -> list[str]:
    """Every such override in the classes of finsight's modules outside ``compat``."""
    found = []
    for path in package_files():
        tree = ast.parse(path.read_text())
        classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef) and node.bases]
        if classes:
            module_name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
            module = importlib.import_module(module_name)
            found += [line for name in classes for line in private_overrides_in(getattr(module, name))]
    return found


def test_no_private_access_to_other_libraries_outside_compat():
    found = [v for path in package_files() for v in violations_in(path)]
    assert not found, "third-party internals used outside finsight/compat/:\n" + "\n".join(found)


def test_no_override_of_a_third_party_private_method():
    found = private_overrides()
    assert not found, "private methods overridden outside finsight/compat/:\n" + "\n".join(found)


def test_the_check_sees_each_kind_of_private_use(tmp_path):
    """Each rule fires on a file that breaks it, so the two tests above can fail."""
    sample = tmp_path / "finsight" / "sample.py"
    sample.parent.mkdir()
    sample.write_text(
        "import deepspeed\n"
        "from transformers.trainer_pt_utils import get_length_grouped_indices\n"
        "from lightning.pytorch.loops import _Loop\n"
        "def f(trainer):\n"
        "    deepspeed.initialize = None\n"
        "    getattr(trainer, '_data_fetcher')\n"
        "    return trainer._checkpoint_connector\n")
    found = "\n".join(violations_in(sample, root=tmp_path))
    for expected in ("internal module transformers.trainer_pt_utils", "private name ['_Loop']",
                     "monkeypatch of deepspeed.initialize", "getattr(..., '_data_fetcher')",
                     "private attribute ._checkpoint_connector"):
        assert expected in found, found


def test_the_check_sees_a_private_override():
    from lightning.pytorch.cli import LightningCLI

    class ReadsCheckpointItself(LightningCLI):
        def _parse_ckpt_path(self) -> None: ...

    assert private_overrides_in(ReadsCheckpointItself) == [
        f"{__name__}.test_the_check_sees_a_private_override.<locals>.ReadsCheckpointItself._parse_ckpt_path "
        "overrides lightning.pytorch.cli.LightningCLI._parse_ckpt_path"]
    from finsight.cli.lightning_cli import FinSightCLI

    assert "_parse_ckpt_path" in dir(FinSightCLI) and private_overrides_in(FinSightCLI) == []  # through compat


@pytest.mark.parametrize("library", ["peft", "bitsandbytes", "deepspeed", "torchmetrics"])
def test_every_library_checked_here_has_a_tested_range(library):
    from finsight import compat

    assert library in compat.TESTED
