"""`finsight chat`: one-shot answers from an adapter folder or a checkpoint, the interactive loop, errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import sampled_fit

from finsight.__main__ import entry
from finsight.cli.lightning_cli import main
from finsight.inference.decoding import PromptTooLongError

QUESTION = "What is an expense ratio?"
# Greedy, in float32: the answers are compared with the float32 4-bit model's (the chat's default dtype
# follows the CPU, bfloat16 where it is native).
GREEDY = ("--temperature", "0", "--repetition_penalty", "1.0", "--compute_dtype", "float32")


def _expected_answer(model_dir: Path, adapter: Path, max_new_tokens: int) -> str:
    """The fine-tuned model's greedy answer, loaded and prompted without finsight's chat code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finsight.data.sources import DEFAULT_SYSTEM_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                         {"role": "user", "content": QUESTION}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_one_shot_answer_from_adapter_and_from_checkpoint(tiny_model_dir, tmp_path_factory, capsys):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    capsys.readouterr()
    assert main(["chat", "--adapter", str(run["adapter"]), "--prompt", QUESTION, "--max_new_tokens", "6", *GREEDY]) == 0
    from_adapter = capsys.readouterr().out.strip()
    # The best checkpoint is what fit exported as the adapter: the same weights, so the same greedy answer.
    assert main(["chat", "--ckpt_path", str(run["best"]), "--prompt", QUESTION, "--max_new_tokens", "6", *GREEDY]) == 0
    from_checkpoint = capsys.readouterr().out.strip()
    assert from_adapter and from_adapter == from_checkpoint
    # Greedy, the merged model the chat generates with answers as the 4-bit PEFT model does.
    assert from_adapter == _expected_answer(tiny_model_dir, run["adapter"], 6)
    with pytest.raises(PromptTooLongError, match=r"at most 56 fit \(max_length 64 - max_new_tokens 8\)"):
        main(["chat", "--adapter", str(run["adapter"]), "--prompt", "word " * 100, "--max_length", "64",
              "--max_new_tokens", "8"])


def test_a_checkpoint_chat_is_cached_by_its_adapter_and_hyper_parameters(tiny_model_dir, tmp_path_factory, tmp_path,
                                                                         capsys, monkeypatch):
    import json

    import torch

    from finsight.checkpoint_files import CheckpointError
    from finsight.inference import merge
    from finsight.inference.cache import ENTRY_FILE, generation_cache_dir
    from finsight.inference.weights import TrainedWeights

    def facts_of(path):
        return TrainedWeights.of_checkpoint(path).cache_facts()["checkpoint"]

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    monkeypatch.setenv("FINSIGHT_CACHE", str(tmp_path / "cache"))
    ask = ["chat", "--ckpt_path", str(run["best"]), "--prompt", QUESTION, "--max_new_tokens", "6", *GREEDY]
    capsys.readouterr()
    assert main(ask) == 0
    built = capsys.readouterr()
    entries = list(generation_cache_dir().iterdir())
    assert len(entries) == 1, entries
    record = json.loads((entries[0] / ENTRY_FILE).read_text())
    assert record["checkpoint"] == str(run["best"]) and record["base"] == str(tiny_model_dir)
    assert "built in" in built.err

    # From the cache: nothing is built (no PEFT, no 4-bit round trip), the answer is the same.
    def no_build(*args, **kwargs):
        raise AssertionError("the cached checkpoint chat built the model")

    monkeypatch.setattr(merge, "merged_from_files", no_build)
    monkeypatch.setattr(merge, "quantized_from_files", no_build)
    assert main(ask) == 0
    cached = capsys.readouterr()
    assert f"loaded from the cache {entries[0]}" in cached.err
    assert cached.out.strip() == built.out.strip() == _expected_answer(tiny_model_dir, run["adapter"], 6)

    # The key follows what the merged weights depend on: LoRA's alpha (not in the tensors) and the tensors.
    facts = facts_of(run["best"])
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["lora_alpha"] *= 2
    torch.save(checkpoint, tmp_path / "alpha.ckpt")
    name = next(k for k in checkpoint["state_dict"] if "lora_B" in k)
    checkpoint["hyper_parameters"]["lora_alpha"] //= 2
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name] + 1e-3
    torch.save(checkpoint, tmp_path / "weights.ckpt")
    alpha, weights = facts_of(tmp_path / "alpha.ckpt"), facts_of(tmp_path / "weights.ckpt")
    assert alpha["adapter_sha256"] == facts["adapter_sha256"] and alpha["hyper_parameters"] != facts["hyper_parameters"]
    assert weights["hyper_parameters"] == facts["hyper_parameters"]
    assert weights["adapter_sha256"] != facts["adapter_sha256"]
    (tmp_path / "damaged.ckpt").write_bytes(run["best"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        facts_of(tmp_path / "damaged.ckpt")


def test_interactive_chat_reads_until_exit(tiny_model_dir, tmp_path_factory, capsys, monkeypatch):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\n/reset\nWhat is a bond?\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(run["adapter"]), "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"FinSight chat with {tiny_model_dir} + adapter" in out
    assert out.count("FinSight: ") == 2 and "(conversation cleared)" in out


def test_chat_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    for args, expected in ((["--adapter", str(tmp_path), "--prompt", "hi"], "has no adapter_config.json"),
                           (["--prompt", "hi"], "needs --adapter, --ckpt_path or --model_name")):
        monkeypatch.setattr(sys, "argv", ["finsight", "chat", *args])
        assert entry() == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_chat_command_in_a_subprocess_exits_0(tiny_model_dir, tmp_path_factory):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "finsight", "chat", "--adapter", str(run["adapter"]),
                             "--prompt", QUESTION, "--max_new_tokens", "6", *GREEDY],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == _expected_answer(tiny_model_dir, run["adapter"], 6)


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_damaged_checkpoint_is_one_error_line_in_export_and_chat(tiny_model_dir, tmp_path_factory, tmp_path,
                                                                  capsys, monkeypatch, damage):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    data = run["best"].read_bytes()
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" + data[4:100])
    commands = {"export": ["export", "--checkpoint", str(damaged), "--output", str(tmp_path / "out")],
                "chat": ["chat", "--ckpt_path", str(damaged), "--prompt", QUESTION]}
    for name, args in commands.items():
        monkeypatch.setattr(sys, "argv", ["finsight", *args])
        assert entry() == 1, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err[-2000:]
        assert err.startswith(f"error: checkpoint {damaged} is truncated or corrupt"), err
        assert err.endswith("use an earlier checkpoint"), err
    assert not (tmp_path / "out").exists()


def test_chat_options_reach_generate(tiny_model_dir, tmp_path_factory, capsys, monkeypatch):
    from transformers import LlamaForCausalLM

    from finsight.cli.lightning_cli import main
    from finsight.model.precision import choose_precision

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    seen = []
    original = LlamaForCausalLM.generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs["generation_config"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    assert main(["chat", "--adapter", str(run["adapter"]), "--prompt", QUESTION, "--max_new_tokens", "4",
                 "--temperature", "0.5", "--top_p", "0.8", "--repetition_penalty", "1.3",
                 "--no_repeat_ngram_size", "3", "--prompt_lookup_tokens", "5", "--seed", "11"]) == 0
    config = seen[-1]
    assert (config.do_sample, config.temperature, config.top_p) == (True, 0.5, 0.8)
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.max_new_tokens) == (1.3, 3, 4)
    assert config.prompt_lookup_num_tokens == 5
    captured = capsys.readouterr()
    # The default compute dtype follows the CPU (bfloat16 where it is native), as training's does.
    dtype = choose_precision().compute_dtype
    assert captured.err.count(f"Generation model: NF4 weights dequantized to {dtype} with the adapter merged") == 1
    # The documented defaults: sampling at 0.7 from the 0.9 nucleus, repetitions penalised by 1.1.
    assert main(["chat", "--adapter", str(run["adapter"]), "--prompt", QUESTION, "--max_new_tokens", "2"]) == 0
    assert (seen[-1].do_sample, seen[-1].temperature, seen[-1].top_p, seen[-1].repetition_penalty) == (
        True, 0.7, 0.9, 1.1)
    assert seen[-1].prompt_lookup_num_tokens is None  # prompt lookup is off unless asked for
