"""The chat's merged model cached on disk: the same tensors as a fresh build, keyed by what they depend on."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_NF4

from finsight.inference import cache
from finsight.inference.cache import ENTRY_FILE, entry_key, generation_cache_dir
from finsight.inference.generation_model import get_generation_model
from finsight.inference.weights import TrainedWeights

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 100, 200]])


def _training_model(base_dir: Path, seed: int, lora_dropout: float = 0.0) -> torch.nn.Module:
    """The tiny model as training holds it (4-bit, LoRA) with non-zero B matrices (fresh ones merge to nothing)."""
    from finsight.model.loading import load_peft_model
    from finsight.model.settings import LoraSettings, MemorySettings

    model = load_peft_model(str(base_dir), TINY_NF4, LoraSettings(r=8, alpha=16, dropout=lora_dropout),
                            MemorySettings(gradient_checkpointing=False)).model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _adapter(base_dir: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter folder of the tiny model."""
    _training_model(base_dir, seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=3)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINSIGHT_CACHE", str(tmp_path / "cache"))
    assert generation_cache_dir() == tmp_path / "cache" / "generation"
    return generation_cache_dir()


def cached_model(reference: str, adapter: str | None, settings=TINY_NF4, dtype="auto", cache=True):
    """What ``finsight chat --adapter`` (or ``--model_name`` alone) gets on a CPU: through the cache."""
    weights = (TrainedWeights.of_adapter(adapter, settings, model_name=reference) if adapter
               else TrainedWeights.of_base(reference, settings))
    return get_generation_model(weights, dtype=dtype, cache=cache)


def _key(reference: str, adapter: str | None, settings: dict) -> str | None:
    weights = (TrainedWeights.of_adapter(adapter, TINY_NF4, model_name=reference) if adapter
               else TrainedWeights.of_base(reference, TINY_NF4))
    return entry_key(weights, settings)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Buffers too: RoPE's frequencies are not in the state dict and must stay float32.
    return {**model.state_dict(), **dict(model.named_buffers())}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_model_is_the_built_model(tiny_model_dir, adapter_dir, cache_dir, dtype):
    built = cached_model(str(tiny_model_dir), str(adapter_dir), dtype=dtype,
                                    settings=TINY_NF4)
    assert "loaded and built" in built.described
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and (entries[0] / ENTRY_FILE).is_file() and (entries[0] / "model.safetensors").is_file()
    facts = json.loads((entries[0] / ENTRY_FILE).read_text())
    assert facts["adapter"] == str(adapter_dir) and facts["settings"]["dtype"] == dtype

    cached = cached_model(str(tiny_model_dir), str(adapter_dir), dtype=dtype,
                                     settings=TINY_NF4)
    assert f"loaded from the cache {entries[0]}" in cached.described
    assert cached.weights == built.weights == f"NF4 weights dequantized to {dtype} with the adapter merged, on cpu"
    ours, theirs = _tensors(cached.model), _tensors(built.model)
    assert ours.keys() == theirs.keys()
    unequal = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert ours["model.rotary_emb.inv_freq"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(cached.model(input_ids=IDS).logits, built.model(input_ids=IDS).logits)


def test_key_follows_the_adapter_bytes_the_base_files_and_the_settings(tiny_model_dir, adapter_dir, tmp_path,
                                                                       cache_dir):
    settings = {"quantization": "nf4", "double_quant": True, "compute_dtype": "float32", "dtype": "float32"}
    key = _key(str(tiny_model_dir), str(adapter_dir), settings)
    assert key == _key(str(tiny_model_dir), str(adapter_dir), dict(settings))  # stable
    assert key != _key(str(tiny_model_dir), None, settings)
    assert key != _key(str(tiny_model_dir), str(adapter_dir), {**settings, "dtype": "bfloat16"})
    assert key != _key(str(tiny_model_dir), str(adapter_dir), {**settings, "double_quant": False})
    # Other adapter weights in the same folder (a new fit into the same log dir): another entry.
    other = _adapter(tiny_model_dir, tmp_path / "other", seed=4)
    assert key != _key(str(tiny_model_dir), str(other), settings)
    # A base weight file rewritten (same name): another entry.
    base = tmp_path / "base"
    base.mkdir()
    for item in tiny_model_dir.iterdir():
        (base / item.name).write_bytes(item.read_bytes())
    first = _key(str(base), str(adapter_dir), settings)
    weights = base / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _key(str(base), str(adapter_dir), settings) != first
    # A Hub id that was never downloaded has no files to key on: no cache, no error.
    assert _key("nobody/not-downloaded", str(adapter_dir), settings) is None


def test_cache_false_writes_nothing_and_a_full_or_read_only_disk_only_skips_it(tiny_model_dir, adapter_dir,
                                                                               cache_dir, monkeypatch, caplog):
    off = cached_model(str(tiny_model_dir), str(adapter_dir), settings=TINY_NF4,
                                  cache=False)
    assert "loaded and built" in off.described and not cache_dir.exists()

    class Usage:
        free = 10**8

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="finsight"):
        patch.setattr(cache.Path, "mkdir", read_only)
        refused = cached_model(str(tiny_model_dir), str(adapter_dir), settings=TINY_NF4)
    assert "loaded and built" in refused.described and "Permission denied" in caplog.text
    caplog.clear()

    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: Usage)
    with caplog.at_level(logging.WARNING, logger="finsight"):
        full = cached_model(str(tiny_model_dir), str(adapter_dir), settings=TINY_NF4)
    assert "loaded and built" in full.described
    assert "Not caching the generation model: 0.1 GB free" in caplog.text
    assert not [item for item in cache_dir.iterdir() if (item / ENTRY_FILE).exists()]


def test_only_the_most_recently_used_entries_are_kept(tiny_model_dir, adapter_dir, cache_dir, monkeypatch):
    monkeypatch.setattr(cache, "KEEP", 2)
    first = cached_model(str(tiny_model_dir), str(adapter_dir), dtype="float32",
                                    settings=TINY_NF4)
    cached_model(str(tiny_model_dir), str(adapter_dir), dtype="bfloat16",
                            settings=TINY_NF4)
    # Using the first entry again makes it the most recent: the bfloat16 one is evicted by the third.
    again = cached_model(str(tiny_model_dir), str(adapter_dir), dtype="float32",
                                    settings=TINY_NF4)
    assert "from the cache" in again.described and "from the cache" not in first.described
    cached_model(str(tiny_model_dir), None, dtype="float32", settings=TINY_NF4)
    kept = [json.loads((item / ENTRY_FILE).read_text()) for item in cache_dir.iterdir()]
    assert sorted((facts["adapter"] is None, facts["settings"]["dtype"]) for facts in kept) == [
        (False, "float32"), (True, "float32")]


def test_a_chat_from_the_cache_imports_neither_peft_nor_bitsandbytes(tiny_model_dir, adapter_dir, tmp_path):
    env = {**os.environ, "FINSIGHT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code = ("import sys; from finsight.inference.generation_model import get_generation_model; "
            "from finsight.inference.weights import TrainedWeights; from finsight.model.settings import NF4; "
            f"g = get_generation_model(TrainedWeights.of_adapter({str(adapter_dir)!r}, NF4)); "
            "print(g.described.split(' (')[-1]); "
            "print(sorted({'peft', 'bitsandbytes', 'lightning'} & set(sys.modules)))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                           check=False) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
    (built, built_modules), (cached, cached_modules) = (run.stdout.strip().splitlines()[-2:] for run in runs)
    assert built.startswith("CPU; loaded and built") and built_modules == "['bitsandbytes', 'peft']"
    assert cached.startswith("CPU; loaded from the cache") and cached_modules == "[]"


def test_chat_standard_output_carries_only_the_answer(adapter_dir, cache_dir, monkeypatch, capsys):
    # Libraries print while a model loads (DeepSpeed announces its accelerator on stdout when saving the
    # cache entry imports it); scripts read the answer from stdout, so that goes to stderr.
    from finsight.cli import chat

    original = chat.get_generation_model

    def noisy(*args, **kwargs):
        print("library notice")
        return original(*args, **kwargs)

    monkeypatch.setattr(chat, "get_generation_model", noisy)
    for _ in range(2):  # built, then from the cache: the same answer
        assert chat.chat(adapter=str(adapter_dir), prompt="What is a bond?", max_new_tokens=5,
                                temperature=0, repetition_penalty=1.0) == 0
    out = capsys.readouterr()
    answers = [line.strip() for line in out.out.splitlines() if line.strip()]  # an answer may start with a space
    assert len(answers) == 2 and answers[0] == answers[1] and "library notice" not in out.out
    assert out.err.count("library notice") == 2 and "Generation model: " in out.err


def test_a_damaged_entry_is_rebuilt_with_a_warning(tiny_model_dir, adapter_dir, cache_dir, caplog):
    built = cached_model(str(tiny_model_dir), str(adapter_dir), settings=TINY_NF4)
    (entry,) = cache_dir.iterdir()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk filled up, a copy cut short
    with caplog.at_level(logging.WARNING, logger="finsight"):
        rebuilt = cached_model(str(tiny_model_dir), str(adapter_dir), settings=TINY_NF4)
    assert f"Generation cache entry {entry} is unreadable" in caplog.text and "building the model again" in caplog.text
    assert "loaded and built" in rebuilt.described
    again = cached_model(str(tiny_model_dir), str(adapter_dir), settings=TINY_NF4)
    assert "from the cache" in again.described
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=IDS).logits, built.model(input_ids=IDS).logits)


def test_the_model_fit_caches_is_the_one_the_chat_builds(tiny_model_dir, tmp_path, cache_dir):
    # What AdapterExport does at the end of a CPU fit (its call is checked in tests/test_quiet.py): the
    # training model (4-bit, LoRA with fused dropout) and the adapter folder it just wrote.
    from finsight.inference.cache import cache_trained_model
    from finsight.inference.merge import merged_from_files

    training = _training_model(tiny_model_dir, seed=7, lora_dropout=0.1)
    training.save_pretrained(tmp_path / "adapter")
    entry = cache_trained_model(training, TrainedWeights.of_adapter(tmp_path / "adapter", TINY_NF4,
                                                                      model_name=str(tiny_model_dir)))
    assert entry is not None and json.loads((entry / ENTRY_FILE).read_text())["written_by"] == "fit"
    # The chat reads the base model from adapter_config.json and finds that entry...
    base = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    cached = cached_model(base, str(tmp_path / "adapter"), settings=TINY_NF4)
    assert f"loaded from the cache {entry}" in cached.described
    # ... which is, tensor for tensor, the model the chat would build from the files.
    built = merged_from_files(TrainedWeights.of_adapter(tmp_path / "adapter", TINY_NF4))
    assert cached.weights == built.weights
    ours, theirs = _tensors(cached.model), _tensors(built.model)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    # The adapter is in it: the projections differ from the base's (same NF4 values, nothing merged).
    plain = merged_from_files(TrainedWeights.of_base(base, TINY_NF4)).model.state_dict()
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])
