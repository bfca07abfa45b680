"""Building the generation model: NF4 dequantized once, adapter merged; the same greedy tokens as the 4-bit layers."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import PROMPTS, TINY_NF4, chat_prompt_ids

from finsight.inference.decoding import generate
from finsight.inference.merge import build_generation_model, from_training_model, merged_from_files
from finsight.inference.weights import TrainedWeights

# float32 merged vs unmerged LoRA on dequantized NF4: only the order of additions differs.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def trained_like(tiny_model_dir):
    """The tiny 4-bit PEFT model with a non-zero adapter (fresh LoRA B is zero and would prove nothing)."""
    from finsight.model.loading import load_peft_model, load_tokenizer
    from finsight.model.settings import LoraSettings, MemorySettings

    loaded = load_peft_model(str(tiny_model_dir), TINY_NF4, LoraSettings(r=8, alpha=16, dropout=0.1),
                             MemorySettings(gradient_checkpointing=False))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return loaded.model, load_tokenizer(str(tiny_model_dir))


def test_merged_model_generates_the_4bit_models_greedy_tokens(trained_like):
    model, tokenizer = trained_like
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    merged = build_generation_model(model, torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    prompts = [chat_prompt_ids(tokenizer, q) for q in PROMPTS]
    ours = generate(merged, tokenizer, prompts, max_new_tokens=16, stop_ids=[-1])
    theirs = generate(model, tokenizer, prompts, max_new_tokens=16, stop_ids=[-1])
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    assert all(len(g.token_ids) == 16 for g in ours)
    ids = torch.tensor([prompts[2]])
    with torch.no_grad():
        model.eval()
        expected = model(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=LOGITS_ATOL)
    # The adapter changes the answer: the comparison is not between two copies of the base.
    with torch.no_grad(), model.disable_adapter():
        assert (model(input_ids=ids).logits - expected).abs().max() > 100 * LOGITS_ATOL
    # The training model is untouched: still 4-bit, adapter unmerged, same LoRA weights.
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_base_without_adapter_and_bfloat16(trained_like):
    model, _ = trained_like
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 100, 200]])
    base = build_generation_model(model, torch.float32, merge_adapter=False)
    with torch.no_grad(), model.disable_adapter():
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, expected, rtol=0, atol=LOGITS_ATOL)
    half = build_generation_model(model, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        merged = build_generation_model(model, torch.float32)(input_ids=ids).logits
        # bfloat16 keeps 8 bits of mantissa: logits agree to about 1% of their range.
        torch.testing.assert_close(half(input_ids=ids).logits.float(), merged, rtol=0,
                                   atol=0.02 * merged.abs().max().item())


def test_choice_is_logged_in_one_line(trained_like, caplog):
    model, _ = trained_like
    with caplog.at_level(logging.INFO, logger="finsight.inference.merge"):
        merged = from_training_model(model)
        kept = from_training_model(model, inference="4bit")
    assert merged.kind == "merged" and merged.model is not model
    assert kept.kind == "4bit" and kept.model is model
    lines = [r.getMessage() for r in caplog.records if r.name == "finsight.inference.merge"]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("Generation model: NF4 weights dequantized to float32 with the adapter merged, on cpu")
    assert lines[1].startswith("Generation model: 4-bit layers as trained")


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_model_built_from_the_files_equals_the_dequantized_training_model(tiny_model_dir, tmp_path, saved_dtype):
    # finsight chat builds its model from the base and adapter files, without 4-bit layers: it must be the
    # dequantized training model tensor for tensor, whatever dtype the base was saved in.
    from transformers import AutoModelForCausalLM

    from finsight.model.loading import load_peft_model
    from finsight.model.settings import LoraSettings, MemorySettings

    base_dir = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=saved_dtype).save_pretrained(base_dir)
    training = load_peft_model(str(base_dir), TINY_NF4, LoraSettings(r=8, alpha=16, dropout=0.1),
                               MemorySettings(gradient_checkpointing=False)).model
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in training.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    training.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 100, 200]])
    original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        expected = build_generation_model(training, dtype)
        built = merged_from_files(TrainedWeights.of_adapter(tmp_path / "adapter", TINY_NF4, model_name=str(base_dir)),
                                  dtype=str(dtype).removeprefix("torch."))
        assert built.kind == "merged" and "NF4 weights dequantized" in built.described
        # Buffers too: non-persistent ones (RoPE's frequencies) are not in the state dict.
        ours = {**built.model.state_dict(), **dict(built.model.named_buffers())}
        theirs = {**expected.state_dict(), **dict(expected.named_buffers())}
        assert ours.keys() == theirs.keys()
        unequal = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
        assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
        with torch.no_grad():
            assert torch.equal(built.model(input_ids=ids).logits, expected(input_ids=ids).logits)
    # The comparison has teeth: projections are quantized (and adapted), embeddings and norms are not.
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"].float(),
                           original["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16).float())
    assert torch.equal(ours["model.norm.weight"], original["model.norm.weight"].to(torch.bfloat16))


def test_base_built_from_the_files_equals_the_dequantized_base(trained_like, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, _ = trained_like
    built = merged_from_files(TrainedWeights.of_base(str(tiny_model_dir), TINY_NF4))
    expected = build_generation_model(model, torch.float32, merge_adapter=False).state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in built.model.state_dict().items())
    assert built.described.startswith("NF4 weights dequantized to float32 without adapter, on cpu")
    # quantization "none" (plain LoRA training) keeps the saved weights as they are.
    unquantized = merged_from_files(TrainedWeights.of_base(str(tiny_model_dir), TINY_NF4.replace(kind="none")))
    name = "model.layers.1.mlp.down_proj.weight"
    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()[name]
    assert torch.equal(unquantized.model.state_dict()[name], saved)
    assert not torch.equal(expected[name], saved)
    assert unquantized.described.startswith("weights to float32 without adapter")
