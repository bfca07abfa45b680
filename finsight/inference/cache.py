"""The chat's merged model kept on disk, so the next chat with the same adapter starts in seconds.

Building the chat's model from the files (:func:`finsight.inference.merge.merged_from_files`) imports PEFT and
bitsandbytes and passes every quantized weight through NF4 and back: most of a short chat's start-up. The
result depends only on the files and the settings, so the first chat saves it (``save_pretrained``,
safetensors) under ``<cache>/generation/<key>`` and later chats load it as an ordinary transformers model,
tensor for tensor the same, without importing either library.

The key covers what the values depend on: the adapter's bytes (for a chat from a training checkpoint, its
adapter tensors and hyper-parameters), the base model's files (name, size, modification time), the
quantization settings, the dtype, and the versions of torch, transformers, PEFT and bitsandbytes. Anything
else gives a new entry, and the :data:`KEEP` most recently used entries are kept. ``<cache>`` is
``$FINSIGHT_CACHE``, else ``$XDG_CACHE_HOME/finsight``, else ``~/.cache/finsight``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from finsight.inference.decoding import GenerationModel, merged_weights
from finsight.inference.weights import TrainedWeights
from finsight.model.loading import load_base_model
from finsight.model.settings import AttentionChoice, QuantizationSettings
from finsight.references import cache_root, resolve_model
from finsight.tensors_only import UnsafeCheckpointError

log = logging.getLogger(__name__)

KEEP = 3
"""Entries kept; each is the size of the dense model (SmolLM2-135M: 0.5 GB in float32)."""

FORMAT = 1
"""Bumped when what an entry holds or how it is keyed changes, so old entries are never read."""

ENTRY_FILE = "finsight_generation.json"
"""Written last into an entry: its presence marks a complete entry, and its time stamp the last use."""

_VALUE_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def generation_cache_dir() -> Path:
    """The folder holding the cached models (one sub-folder per key)."""
    return cache_root() / "generation"


def _base_folder(reference: str) -> Path | None:
    """The local folder a base reference loads from, or None when it is not on disk (nothing to key on)."""
    resolved = resolve_model(reference)
    if Path(resolved).is_dir():
        return Path(resolved).resolve()
    # A Hub id: the snapshot folder its files were downloaded into (named by the commit).
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(resolved, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def entry_key(weights: TrainedWeights, settings: dict[str, str | bool]) -> str | None:
    """The cache key of a merged model, or None when the base model's files cannot be found locally.

    Base files are keyed by name, size and modification time (hashing gigabytes at every start would cost
    what the cache saves); the adapter, small, by its bytes (``TrainedWeights.cache_facts``).
    """
    base = _base_folder(weights.reference)
    if base is None:
        return None
    facts: dict[str, object] = {"format": FORMAT, "settings": settings, "base": str(base), **weights.cache_facts()}
    facts["base_files"] = sorted((item.name, item.stat().st_size, item.stat().st_mtime_ns)
                                 for item in base.iterdir() if item.is_file())
    facts["versions"] = {name: importlib.metadata.version(name) for name in _VALUE_LIBRARIES}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


ENTRY_SUFFIXES = (".safetensors", ".json")
"""What an entry holds when finsight wrote it (``save_pretrained`` with safetensors, and its record)."""


def check_entry_is_data(entry: Path) -> None:
    """Refuse an entry holding any file finsight never writes there (a pickled ``pytorch_model.bin``, a
    ``.py`` file): transformers would load a pickle, and the folder is not what finsight cached. Left in place,
    for whoever looks into how it got there."""
    foreign = sorted(item.name for item in entry.iterdir() if not item.name.endswith(ENTRY_SUFFIXES))
    if foreign:
        raise UnsafeCheckpointError(
            f"generation cache entry {entry} holds {', '.join(foreign)}, which finsight never writes there (only "
            f"safetensors and JSON): refused, nothing in it was run; remove the entry (rm -r {entry}) and check "
            "who can write to the cache folder")


def _load(entry: Path, dtype: str, attn_implementation: AttentionChoice) -> GenerationModel:
    started = time.perf_counter()
    facts = json.loads((entry / ENTRY_FILE).read_text())
    dense = QuantizationSettings(kind="none", compute_dtype=dtype, attn_implementation=attn_implementation)  # type: ignore[arg-type]
    model, _, _ = load_base_model(str(entry), dense, on_gpu=False)
    os.utime(entry / ENTRY_FILE)  # the last use, for keeping the most recent entries
    described = (f"{facts['weights']} (CPU; loaded from the cache {entry} "
                 f"in {time.perf_counter() - started:.1f}s)")
    log.info("Generation model: %s", described)
    return GenerationModel(model.eval(), "merged", described, weights=facts["weights"])


def _store(generator: GenerationModel, entry: Path, facts: dict[str, object]) -> bool:
    """Save the model as the entry, atomically; False (logged) when the disk has no room for it."""
    size = sum(p.numel() * p.element_size() for p in generator.model.parameters())
    entry.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(entry.parent).free
    if free < size + (1 << 30):
        log.warning("Not caching the generation model: %.1f GB free in %s, it needs %.1f GB and 1 GB spare",
                    free / 1e9, entry.parent, size / 1e9)
        return False
    partial = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".partial-"))
    try:
        generator.model.save_pretrained(partial, safe_serialization=True)
        (partial / ENTRY_FILE).write_text(json.dumps({**facts, "weights": generator.weights}, indent=2))
        if entry.exists() and not (entry / ENTRY_FILE).is_file():
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry left by hand: replaced
        try:
            partial.replace(entry)
        except OSError:
            if not (entry / ENTRY_FILE).is_file():
                raise
            # Another chat cached the same model meanwhile; its complete entry stays.
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _keep_recent(entry.parent)
    return True


def _keep_recent(folder: Path) -> None:
    entries = [item for item in folder.iterdir() if (item / ENTRY_FILE).is_file()]
    entries.sort(key=lambda item: (item / ENTRY_FILE).stat().st_mtime_ns, reverse=True)
    for stale in entries[KEEP:]:
        shutil.rmtree(stale, ignore_errors=True)


def _settings(settings: QuantizationSettings, dtype: str) -> dict[str, str | bool]:
    return {**settings.key(), "dtype": dtype}


def cache_entry(weights: TrainedWeights, dtype: str) -> Path | None:
    """The entry that holds (or will hold) the merged model of ``weights`` in ``dtype``; None when not keyable."""
    key = entry_key(weights, _settings(weights.settings, dtype))
    return generation_cache_dir() / key if key else None


def load_entry(entry: Path, dtype: str, attn_implementation: AttentionChoice) -> GenerationModel | None:
    """The entry's model when it holds a complete, readable one; None otherwise (a broken entry is removed).

    An entry holding a file finsight never writes there raises ``UnsafeCheckpointError`` instead.
    """
    if not (entry / ENTRY_FILE).is_file():
        return None
    check_entry_is_data(entry)
    try:
        return _load(entry, dtype, attn_implementation)
    except Exception as error:  # noqa: BLE001 - whatever broke the entry (a truncated file, a bad header)
        log.warning("Generation cache entry %s is unreadable (%s: %s); building the model again",
                    entry, type(error).__name__, str(error)[:200])
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _record(weights: TrainedWeights, dtype: str, written_by: str) -> dict[str, object]:
    """The entry's record, for whoever looks into the cache folder (the key says nothing readable)."""
    source = ({"checkpoint": str(weights.checkpoint)} if weights.checkpoint is not None
              else {"adapter": str(weights.adapter) if weights.adapter is not None else None})
    return {"base": weights.reference, **source, "settings": _settings(weights.settings, dtype),
            "written_by": written_by, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def store_entry(generator: GenerationModel, entry: Path, weights: TrainedWeights, dtype: str,
                written_by: str) -> bool:
    """Save a just-built merged model as ``entry``; False (logged) when the cache folder cannot take it.

    A read-only or full cache folder costs the next chat time, never this answer.
    """
    try:
        stored = _store(generator, entry, _record(weights, dtype, written_by))
    except OSError as error:
        log.warning("Not caching the generation model in %s (%s)", entry, error)
        return False
    if stored:
        log.info("Generation model cached in %s: the next chat with this model loads it from there", entry)
    return stored


def cache_trained_model(model: torch.nn.Module, weights: TrainedWeights) -> Path | None:
    """Save the merged model of a just-written adapter where a chat with it on this machine looks first.

    ``model`` is the training model (4-bit base, LoRA) whose adapter ``weights`` names; the entry is the one
    :func:`finsight.inference.generation_model.get_generation_model` finds for those weights with the default
    dtype (the compute dtype), so the first chat after ``fit`` starts as fast as later ones. The merged model
    is built from ``model`` (:func:`finsight.inference.merge.build_generation_model`, the same tensors as built
    from the files). Returns the entry, or None when the base has no local files or the disk lacks room.
    """
    dtype = weights.settings.compute_dtype
    entry = cache_entry(weights, dtype)
    if entry is None:
        return None
    if (entry / ENTRY_FILE).is_file():
        return entry
    from finsight.inference.merge import build_generation_model

    dense = build_generation_model(model, getattr(torch, dtype))
    described = merged_weights(weights.settings.kind if weights.settings.quantized else None,
                               getattr(torch, dtype), adapter=True)
    # Errors reach the caller (AdapterExport), which warns and says where the chat's model was meant to go.
    stored = _store(GenerationModel(dense, "merged", described, weights=described), entry,
                    _record(weights, dtype, "fit"))
    return entry if stored else None
