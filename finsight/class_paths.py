"""The class a parsed config value names: ``trainer.strategy``, ``trainer.logger``, a callback entry."""

from __future__ import annotations

import importlib
from typing import Any


def configured_class(value: Any) -> type | None:
    """The class of a ``class_path`` namespace or mapping, or of an instance; None for a name, a flag or nothing.

    Read before LightningCLI instantiates anything, to decide by class (a DeepSpeed strategy, a logger without a
    folder of its own, a checkpoint callback) what must be settled first.
    """
    class_path = value.get("class_path") if isinstance(value, dict) else getattr(value, "class_path", None)
    if isinstance(class_path, str):
        module, _, name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return None  # jsonargparse has already rejected unknown classes; nothing to decide here
    return None if isinstance(value, str | dict | bool | type(None)) else type(value)
