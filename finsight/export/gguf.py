"""Writing a merged model as one GGUF file for llama.cpp, Ollama and LM Studio, with the ``gguf`` package.

The file holds the weights (``f16``, ``bf16`` or ``q8_0``), the model's hyper-parameters, the tokenizer
(vocabulary, merges, special tokens) and the chat template, so ``llama-cli -m model.gguf`` chats with the
same prompt format finsight trained on. The ``gguf`` package provides the writer (``GGUFWriter``), the
tensor names (``TensorNameMap``), the tokenizer readers (``BpeVocab``, ``LlamaHfVocab``,
``SentencePieceVocab``, ``SpecialVocab``) and the quantization; finsight only maps one model onto them.
Llama-family models are supported (SmolLM2, Llama-2, Mistral: llama.cpp runs all three as ``llama``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

from finsight.atomic import atomic_path
from finsight.errors import FinSightError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GGUFType = Literal["f16", "bf16", "q8_0"]

# transformers class → the llama.cpp architecture it is written as.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


class GGUFExportError(FinSightError, ValueError):
    """A model or tokenizer this GGUF writer cannot represent; the message says which and what is supported.

    Fix: export a Llama-family model with a SentencePiece or byte-level BPE tokenizer, or export the merged
    model and convert it with llama.cpp's `convert_hf_to_gguf.py`.
    """


def _file_type(gguf_type: GGUFType) -> Any:

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]


def _encode(data: np.ndarray, gguf_type: GGUFType) -> tuple[np.ndarray, Any]:
    """A float32 tensor in the file's type, as llama.cpp's converter stores it: vectors stay float32, and
    matrices whose rows do not fill whole q8_0 blocks fall back to f16."""

    if data.ndim < 2:
        return data.astype(np.float32), Q.F32
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
    if gguf_type == "bf16":
        return gguf.quants.quantize(data, Q.BF16), Q.BF16
    return data.astype(np.float16), Q.F16


def _rope_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection rows from transformers' rotate-half RoPE layout into llama.cpp's pairwise one.

    The GGUF format itself defines this layout (transformers' GGUF loader undoes it when reading), so it is
    part of writing the file, not of the model.
    """
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocab(tokenizer_dir: Path) -> Any:
    """The ``gguf`` vocabulary reader for this tokenizer: byte-fallback BPE (Llama-2, Mistral), byte-level
    BPE (SmolLM2, GPT-2 style), or a sentencepiece model."""

    for kind in (LlamaHfVocab, BpeVocab, SentencePieceVocab):
        try:
            return kind(tokenizer_dir)
        except (FileNotFoundError, ImportError):
            continue
    raise GGUFExportError(f"the tokenizer in {tokenizer_dir} is neither a byte-level BPE, a Llama (byte-fallback "
                          "BPE) nor a sentencepiece tokenizer, which are what the GGUF tokenizer types can hold")


def _pre_tokenizer(vocab: Any, tokenizer_dir: Path, source_gguf: Path | None) -> str:
    """``tokenizer.ggml.pre``: how llama.cpp splits text before BPE; it must match the training tokenizer."""
    if source_gguf is not None:

        field = gguf.GGUFReader(source_gguf).get_field("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    if vocab.tokenizer_model != "gpt2":
        return "default"
    pre = json.loads((tokenizer_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's split pattern (byte-level BPE); "gpt2" is the tokenizer model
    raise GGUFExportError(f"the tokenizer in {tokenizer_dir} splits text with a {pre.get('type')!r} pre-tokenizer "
                          "that cannot be named in GGUF; export from a model that came as a GGUF file, whose "
                          "pre-tokenizer name is reused")


def _token_types(tokenizer: PreTrainedTokenizerBase, tokens: list, types: list) -> list:
    """Special tokens (``<|im_start|>``, ``</s>``) as CONTROL, other added tokens as USER_DEFINED: llama.cpp and
    transformers only keep a token whole in text when its type says so."""

    types = list(types)
    for index, token in tokenizer.added_tokens_decoder.items():
        if index < len(tokens):
            types[index] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    return types


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path,
               gguf_type: GGUFType = "f16", *, name: str = "finsight", source_gguf: str | Path | None = None) -> Path:
    """Write ``model`` (a dense transformers Llama-family model) and ``tokenizer`` into one GGUF file.

    ``source_gguf``: the GGUF file the base model came from, if any; its pre-tokenizer name is reused.
    """

    architecture = type(model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM2, Llama-2, "
                              f"Mistral); this model is a {architecture}")
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise GGUFExportError(f"GGUF export supports plain RoPE; this model uses {rope.get('rope_type')!r} scaling")
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    path = Path(path)
    with atomic_path(path, f"the GGUF file {path.name}") as temporary:
        _write(gguf.GGUFWriter(str(temporary), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]), model, tokenizer,
               gguf_type, name=name, source_gguf=source_gguf, head_dim=head_dim, heads=heads, kv_heads=kv_heads,
               rope_theta=float(rope_theta))
    log.info("GGUF (%s) written to %s", gguf_type, path)
    return path


def _write(writer: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf_type: GGUFType, *,
           name: str, source_gguf: str | Path | None, head_dim: int, heads: int, kv_heads: int,
           rope_theta: float) -> None:
    """Fill and write an open ``GGUFWriter`` (the temporary file ``write_gguf`` renames into place)."""
    config = model.config
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf_type))

    with tempfile.TemporaryDirectory() as folder:
        tokenizer_dir = Path(folder)
        tokenizer.save_pretrained(str(tokenizer_dir))
        vocab = _vocab(tokenizer_dir)
        tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
        for index in range(len(tokens), config.vocab_size):  # rows of the embedding no token uses
            tokens.append(f"[PAD{index}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(_pre_tokenizer(vocab, tokenizer_dir, Path(source_gguf) if source_gguf else None))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(_token_types(tokenizer, tokens, types))
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        if special.chat_template is None and tokenizer.chat_template:
            special.chat_template = tokenizer.chat_template
        # Say whether a BOS token starts every text: llama.cpp's default for a vocabulary type may differ.
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        special.add_special_token.setdefault("bos", adds_bos)
        special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"no GGUF tensor name for {key!r} of {type(model).__name__}")
        data = tensor.detach().to(torch.float32).cpu()
        if key.endswith("q_proj.weight"):
            data = _rope_permute(data, heads)
        elif key.endswith("k_proj.weight"):
            data = _rope_permute(data, kv_heads)
        encoded, raw_type = _encode(data.numpy(), gguf_type)
        writer.add_tensor(target, encoded, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
