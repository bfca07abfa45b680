"""Shared fixtures: a tiny random Llama and a tokenizer built offline, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import build_tiny_model_folder, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session caches prepared data and converted models in its own folder."""
    monkeypatch.setenv("FINSIGHT_CACHE", str(tmp_path_factory.getbasetemp() / "finsight-cache"))


