"""Shared fixtures: a tiny random Llama and a tokenizer built offline, never downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SAMPLES = Path(__file__).resolve().parents[1] / "finsight" / "data" / "samples"


def build_tokenizer(template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE trained on the bundled samples, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("reddit_finance.jsonl", "company_qa.jsonl"):
        for line in (SAMPLES / name).read_text().splitlines():
            row = json.loads(line)
            texts.extend(str(v) for v in row.values() if isinstance(v, str))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


def build_tiny_model_folder(folder: Path, tokenizer) -> Path:
    """A 2-layer random Llama saved as an ordinary Hugging Face folder with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


# Runs of the quickstart config pin float32: the config's precision follows the CPU (bf16-mixed where it is
# native), and the tests compare with float32 references on every machine. tests/test_precision.py covers
# the choice itself.
FLOAT32_PRECISION = "--trainer.precision=32-true"


def sample_sources(reddit_fraction: float = 0.67, intro_rows: int = 40) -> list[dict]:
    """The bundled mixture, as the quickstart uses it."""
    return [
        {"name": "reddit_finance", "path": "bundled:reddit_finance", "format": "reddit",
         "fraction": reddit_fraction},
        {"name": "company_qa", "path": "bundled:company_qa", "format": "qa", "fraction": 1.0},
        {"name": "intro", "format": "intro", "fraction": 1.0, "rows": intro_rows},
    ]


def prepared_datamodule(model_dir: Path, max_length: int, batch_size: int):
    """The bundled mixture prepared with one process and set up for fitting."""
    from finsight import FinSightDataModule

    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(model_dir), max_length=max_length,
                            batch_size=batch_size, num_proc=1)
    dm.prepare_data()
    dm.setup("fit")
    return dm
