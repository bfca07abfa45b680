"""The chat's merged model kept on disk, so the next chat with the same adapter starts in seconds.

Building the chat's model from the files (:func:`finsight.inference.generation_model.load_generation_model`) imports PEFT and
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch

from finsight.inference.decoding import GenerationModel, InferenceDtype, merged_weights
from finsight.model.loading import load_base_model
from finsight.model.settings import NF4, AttentionChoice, QuantizationSettings
from finsight.references import cache_root, resolve_model

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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_folder(reference: str) -> Path | None:
    """The local folder a base reference loads from, or None when it is not on disk (nothing to key on)."""
    resolved = resolve_model(reference)
    if Path(resolved).is_dir():
        return Path(resolved).resolve()
    # A Hub id: the snapshot folder its files were downloaded into (named by the commit).
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(resolved, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def entry_key(reference: str, adapter: str | None, settings: dict[str, str | bool],
              checkpoint: dict[str, object] | None = None) -> str | None:
    """The cache key of a merged model, or None when the base model's files cannot be found locally.

    Base files are keyed by name, size and modification time (hashing gigabytes at every start would cost
    what the cache saves); the adapter, small, by its bytes; a checkpoint by :func:`checkpoint_facts`.
    """
    base = _base_folder(reference)
    if base is None:
        return None
    facts: dict[str, object] = {"format": FORMAT, "settings": settings, "base": str(base)}
    if checkpoint is not None:
        facts["checkpoint"] = checkpoint
    facts["base_files"] = sorted((item.name, item.stat().st_size, item.stat().st_mtime_ns)
                                 for item in base.iterdir() if item.is_file())
    if adapter is not None:
        folder = Path(adapter)
        facts["adapter"] = sorted((item.name, _file_digest(item)) for item in folder.iterdir()
                                  if item.is_file() and item.name.startswith("adapter_"))
    facts["versions"] = {name: importlib.metadata.version(name) for name in _VALUE_LIBRARIES}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


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


def _facts(reference: str, adapter: str | None, settings: dict[str, str | bool], written_by: str,
           checkpoint: str | None = None) -> dict:
    """The entry's record, for whoever looks into the cache folder (the key says nothing readable)."""
    source = {"checkpoint": checkpoint} if checkpoint is not None else {"adapter": adapter}
    return {"base": reference, **source, "settings": settings, "written_by": written_by,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _cached_or_built(entry: Path | None, target: str, attn_implementation: AttentionChoice,
                     build: Callable[[], GenerationModel], facts: dict[str, object]) -> GenerationModel:
    """The entry's model when it holds a complete one; else ``build()``, saved as the entry (unless None)."""
    if entry is not None and (entry / ENTRY_FILE).is_file():
        try:
            return _load(entry, target, attn_implementation)
        except Exception as error:  # noqa: BLE001 - whatever broke the entry (a truncated file, a bad header)
            log.warning("Generation cache entry %s is unreadable (%s: %s); building the model again",
                        entry, type(error).__name__, str(error)[:200])
            shutil.rmtree(entry, ignore_errors=True)
    generator = build()
    if entry is not None:
        try:
            stored = _store(generator, entry, facts)
        except OSError as error:  # a read-only or full cache folder costs the next chat time, not this answer
            log.warning("Not caching the generation model in %s (%s)", entry, error)
            stored = False
        if stored:
            log.info("Generation model cached in %s: the next chat with this model loads it from there", entry)
    return generator


def cached_generation_model(reference: str, *, adapter: str | None,
                            settings: QuantizationSettings = NF4, dtype: InferenceDtype = "auto",
                            cache: bool = True) -> GenerationModel:
    """:func:`finsight.inference.generation_model.load_generation_model`, loaded from the cache when it was built before.

    On a miss the model is built (PEFT and bitsandbytes are imported only then) and, with ``cache``, saved
    for the next time. ``cache=False`` neither reads nor writes the cache.
    """
    target = settings.compute_dtype if dtype == "auto" else dtype
    recorded = _settings(settings, target)
    key = entry_key(reference, adapter, recorded) if cache else None

    def build() -> GenerationModel:
        # Imported on a miss only: bitsandbytes and PEFT are most of the start-up a cached chat saves.
        from finsight.inference.generation_model import load_generation_model

        return load_generation_model(reference, adapter=adapter, settings=settings, dtype=dtype)

    return _cached_or_built(generation_cache_dir() / key if key else None, target, settings.attn_implementation,
                            build, _facts(reference, adapter, recorded, "chat"))


def checkpoint_facts(ckpt_path: str | Path) -> dict[str, object] | None:
    """What a training checkpoint's merged model depends on besides the base files, or None when not keyable.

    Its hyper-parameters (base reference, quantization, LoRA rank and alpha, ...) and a digest of its adapter
    tensors, read memory-mapped (the optimizer state beside them is never read). None for a DeepSpeed folder
    or a file torch cannot read: the training route then loads it and reports what is wrong.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        hyper_parameters, state = dict(checkpoint["hyper_parameters"]), checkpoint["state_dict"]
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().reshape(-1).contiguous().view(torch.uint8).numpy())
    except Exception:  # noqa: BLE001 - any unreadable file: not cached, the training route names the problem
        return None
    return {"hyper_parameters": json.loads(json.dumps(hyper_parameters, sort_keys=True, default=str)),
            "adapter_sha256": digest.hexdigest()}


def cached_checkpoint_model(ckpt_path: str, build: Callable[[], GenerationModel], *, model_name: str | None,
                            overrides: Mapping[str, object], dtype: InferenceDtype = "auto",
                            ) -> tuple[GenerationModel, str] | None:
    """A checkpoint's merged model from the cache, or ``build()`` (the training route) saved there.

    Returns the model and its base reference (``model_name``, else the checkpoint's), or None when the
    checkpoint cannot be keyed (see :func:`checkpoint_facts`) or its base has no local files: then the caller
    builds without the cache. ``overrides``: the flat keys the chat sets over the checkpoint's own
    (``compute_dtype``, ``attn_implementation``, ``quantization``), as ``build`` applies them.
    """
    facts = checkpoint_facts(ckpt_path)
    if facts is None:
        return None
    trained = cast(dict, facts["hyper_parameters"])
    reference = model_name or trained.get("model_name")
    if not reference:
        return None
    settings = QuantizationSettings.from_hparams({**trained, **overrides})
    target = settings.compute_dtype if dtype == "auto" else dtype
    recorded = _settings(settings, target)
    key = entry_key(reference, None, recorded, checkpoint=facts)
    if key is None:
        return None
    record = _facts(reference, None, recorded, "chat", checkpoint=str(ckpt_path))
    return (_cached_or_built(generation_cache_dir() / key, target, settings.attn_implementation, build, record),
            reference)


def cache_trained_model(model: torch.nn.Module, reference: str, adapter: str,
                        settings: QuantizationSettings) -> Path | None:
    """Save the merged model of a just-written adapter where a chat with it on this machine looks first.

    ``model`` is the training model (4-bit base, LoRA) whose adapter was written to ``adapter``; the entry is
    the one :func:`cached_generation_model` finds for that adapter with the same settings and the default
    dtype (the compute dtype), so the first chat after ``fit`` starts as fast as later ones. The merged model
    is built from ``model`` (:func:`finsight.inference.generation_model.build_generation_model`, the same tensors as built
    from the files). Returns the entry, or None when the base has no local files or the disk lacks room.
    """
    recorded = _settings(settings, settings.compute_dtype)
    key = entry_key(reference, adapter, recorded)
    if key is None:
        return None
    entry = generation_cache_dir() / key
    if (entry / ENTRY_FILE).is_file():
        return entry
    from finsight.inference.generation_model import build_generation_model

    dtype = getattr(torch, settings.compute_dtype)
    dense = build_generation_model(model, dtype)
    weights = merged_weights(settings.kind if settings.quantized else None, dtype, adapter=True)
    stored = _store(GenerationModel(dense, "merged", weights, weights=weights), entry,
                    _facts(reference, adapter, recorded, "fit"))
    return entry if stored else None
