"""Building the model that generates: the trained weights, exactly, in the fastest form this device runs them.

Training keeps the base in 4-bit NF4 and the LoRA adapter beside it. Generating through those layers is
the slowest way to run the same weights on a CPU: every forward dequantizes every weight again, and the
adapter adds two extra matmuls per layer. :func:`build_generation_model` instead dequantizes the NF4
weights once, with bitsandbytes' own ``dequantize_4bit`` (the values the 4-bit matmul computes with),
into the compute dtype, and merges the adapter into them with PEFT (``merge_and_unload``). The result
is an ordinary ``transformers`` model: the model that was trained and evaluated, as dense layers.

:func:`from_training_model` decides when to do this (always on a CPU; on a GPU when the dense model fits)
and says what it chose in one log line. The training model is never modified.

:func:`merged_from_files` builds the same model straight from the files when there is no training model
to start from (``finsight chat`` on a CPU): the base is loaded dense, exactly the weights that loading in
4-bit would quantize go through bitsandbytes' own ``quantize_4bit``/``dequantize_4bit`` with the 4-bit
layer's settings, and PEFT merges the adapter. Same values, without building 4-bit layers and a LoRA model
over them only to dequantize them again. :func:`quantized_from_files` loads the model as training holds it
(4-bit layers, the adapter beside them) for ``--inference 4bit`` and GPUs.

Callers do not choose among these: :func:`finsight.inference.generation_model.get_generation_model` does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from finsight import compat
from finsight.checkpoint_files import CheckpointContentError
from finsight.inference.decoding import GenerationModel, InferenceChoice, InferenceDtype, merged_weights
from finsight.inference.weights import TrainedWeights
from finsight.model.loading import load_base_model, quantization_config, torch_dtype
from finsight.model.settings import QuantizationSettings

log = logging.getLogger(__name__)

# A dense copy on the GPU must leave room for the KV cache and activations of a batch.
GPU_FREE_MEMORY_SHARE = 0.5


def _base_and_adapter(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The transformers model under a PEFT wrapper (or the model itself) and the active LoRA config."""
    if isinstance(model, PeftModel):
        return model.get_base_model(), model.peft_config[model.active_adapter]
    return model, None


def _plain_state_dict(base: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights under plain transformers names, 4-bit weights dequantized, all in ``dtype``.

    Names are the transformers model's own (PEFT's ``base_layer.`` infix and the LoRA tensors removed),
    so the result loads into a freshly built model of the same config.
    """
    quantized = compat.bitsandbytes.linear_4bit_layers(base)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in base.state_dict(keep_vars=True).items():
            if compat.peft.is_lora_tensor(name) or compat.bitsandbytes.is_quant_state_key(name, quantized):
                continue
            plain = compat.peft.base_weight_name(name)
            module_name, _, leaf = name.rpartition(".")
            layer = quantized.get(module_name)
            if layer is not None and leaf == "weight":
                tensor = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            state[plain] = tensor.detach().to(dtype)
    return state


def build_generation_model(model: torch.nn.Module, dtype: torch.dtype, *, merge_adapter: bool = True,
                           device: torch.device | str | None = None) -> torch.nn.Module:
    """A dense transformers model with the trained weights: NF4 dequantized once, the adapter merged.

    ``model`` is the training model (a PEFT model over a 4-bit, or unquantized, transformers model) and is
    left unchanged. ``merge_adapter=False`` gives the base alone (``finsight test --compare_base``).
    """
    base, lora = _base_and_adapter(model)
    # Building draws nothing from the run's random streams (PEFT initialises LoRA weights before they are
    # overwritten): samples generated mid-training must leave the training result unchanged.
    with torch.random.fork_rng(devices=[]):
        return _build(model, base, lora, dtype, merge_adapter, device)


def _build(model: torch.nn.Module, base: torch.nn.Module, lora: Any, dtype: torch.dtype, merge_adapter: bool,
           device: torch.device | str | None) -> torch.nn.Module:
    state = _plain_state_dict(base, dtype)
    config = base.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with compat.transformers.no_weight_init():  # every weight is replaced right after
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=compat.transformers.attention_implementation(config))
    compat.transformers.drop_quantization_settings(dense.config)  # this model is dense and saves as a plain checkpoint
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    # Tied output embeddings are not separate tensors in the state dict of some versions.
    missing = [name for name in missing if name not in compat.transformers.tied_weight_names(dense)]
    if missing or unexpected:
        raise RuntimeError(f"dequantized weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    dense.tie_weights()
    dense.generation_config = base.generation_config
    dense.to(device).eval()
    return _merged(dense, lora, get_peft_model_state_dict(model) if merge_adapter and lora is not None else None)


def _merged(dense: torch.nn.Module, lora: Any, adapter_state: dict[str, torch.Tensor] | None,
            weights: TrainedWeights | None = None) -> torch.nn.Module:
    """``dense`` with the adapter (config and weights) merged by PEFT, ready to generate."""
    if adapter_state is not None:
        wrapped = PeftModel(dense, lora)
        _load_adapter_state(wrapped, adapter_state, weights)
        dense = wrapped.merge_and_unload()  # PEFT's merge: W + scaling * B @ A, in the model's dtype
    dense.config.use_cache = True
    dense.requires_grad_(False)
    return dense.eval()


def nf4_round_trip(model: torch.nn.Module, settings: QuantizationSettings) -> int:
    """Replace every weight that loading in 4-bit would quantize by its quantized-then-dequantized value.

    Which layers: the ones transformers replaces by bitsandbytes layers (``compat.transformers.bnb_quantized_layer_names``).
    How: bitsandbytes' ``quantize_4bit`` with the settings of the ``Linear4bit`` layer transformers builds
    (blocksize, double quantization, quant type, storage), then ``dequantize_4bit``: bit for bit the
    weights the 4-bit layers compute with. Returns the number of layers changed.
    """
    config = quantization_config(settings)
    if config is None:
        return 0
    layer = bnb.nn.Linear4bit(1, 1, bias=False, compute_dtype=torch_dtype(settings.compute_dtype),
                              compress_statistics=config.bnb_4bit_use_double_quant,
                              quant_type=config.bnb_4bit_quant_type,
                              quant_storage=config.bnb_4bit_quant_storage, device="meta").weight
    names = compat.transformers.bnb_quantized_layer_names(model, config)
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            packed, state = quantize_4bit(weight.data.contiguous(), blocksize=layer.blocksize,
                                          compress_statistics=layer.compress_statistics,
                                          quant_type=layer.quant_type, quant_storage=layer.quant_storage)
            weight.data = dequantize_4bit(packed, state)
    return len(names)


def merged_from_files(weights: TrainedWeights, dtype: InferenceDtype = "auto") -> GenerationModel:
    """The merged generation model of a base and its adapter (folder or checkpoint), built from the files on the CPU.

    Equal, tensor for tensor, to :func:`build_generation_model` of the training model loaded with the same
    settings, and cheaper: no 4-bit layers, no LoRA layers over them. No adapter gives the base alone.
    """
    started = time.perf_counter()
    settings = weights.settings
    target = torch_dtype(settings.compute_dtype) if dtype == "auto" else getattr(torch, dtype)
    # The base unquantized, in the compute dtype: the values the 4-bit loader would quantize.
    dense, _, _ = load_base_model(weights.reference, settings.replace(kind="none"), on_gpu=False)
    quantized = nf4_round_trip(dense, settings)
    with torch.no_grad():
        # Parameters only, as loading in ``target`` would give: transformers keeps buffers such as RoPE's
        # frequencies in float32 whatever the model's dtype (``model.to(bfloat16)`` would round them too).
        for parameter in dense.parameters():
            parameter.data = parameter.data.to(target)
    lora, state = weights.lora() or (None, None)
    # PEFT initialises LoRA weights (drawing random numbers) before they are overwritten: keep the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        merged = _merged(dense, lora, state, weights)
    what = merged_weights(settings.kind if quantized else None, target, weights.has_adapter)
    described = f"{what} (CPU; loaded and built in {time.perf_counter() - started:.1f}s)"
    log.info("Generation model: %s", described)
    return GenerationModel(merged, "merged", described, weights=what)


def quantized_from_files(weights: TrainedWeights) -> torch.nn.Module:
    """The model as training holds it: the base quantized (on the GPU when there is one), the adapter on it."""
    base, _, _ = load_base_model(weights.reference, weights.settings, on_gpu=True)
    adapter = weights.lora()
    if adapter is None:
        return base.eval()
    config, state = adapter
    with torch.random.fork_rng(devices=[]):  # PEFT's LoRA initialisation, overwritten right after
        model = PeftModel(base, config)
    _load_adapter_state(model, state, weights)
    return model.eval()


def _load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor], weights: TrainedWeights | None) -> None:
    """Put the adapter's tensors into ``model``; tensors this model has no place for are refused by name
    (``weights``: where they came from; None for the training model's own, which always fit)."""
    result = set_peft_model_state_dict(model, state)
    unexpected = [name for name in getattr(result, "unexpected_keys", []) if compat.peft.is_lora_tensor(name)]
    if unexpected:
        source = (weights.checkpoint or weights.adapter) if weights is not None else "the adapter"
        raise CheckpointContentError(f"{source} holds weights this model does not "
                                     f"have: {unexpected[:3]}")


def _dense_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    elements = sum(p.numel() for p in model.parameters())
    # 4-bit parameters are stored packed: two weights per uint8 element.
    elements += sum(layer.weight.numel() for layer in compat.bitsandbytes.linear_4bit_layers(model).values())
    return elements * torch.finfo(dtype).bits // 8


def resolve_dtype(requested: InferenceDtype, model: torch.nn.Module) -> torch.dtype:
    """``auto``: the dtype the 4-bit layers compute in (the training compute dtype), else the model's."""
    if requested != "auto":
        return getattr(torch, requested)
    layers = list(compat.bitsandbytes.linear_4bit_layers(model).values())
    if layers and getattr(layers[0], "compute_dtype", None) is not None:
        return layers[0].compute_dtype
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def from_training_model(model: torch.nn.Module, *, inference: InferenceChoice = "auto",
                     dtype: InferenceDtype = "auto", merge_adapter: bool = True) -> GenerationModel:
    """The model chat, test and the training samples generate with, chosen and logged in one line.

    ``auto`` builds the merged dense model on a CPU (several times faster than the 4-bit layers there,
    with the same greedy tokens) and on a GPU when it fits in half the free memory; otherwise, or with
    ``4bit``, the training model is used as it is.
    """
    device = next(model.parameters()).device
    target = resolve_dtype(dtype, model)
    kind = inference
    reason = "requested"
    if inference == "auto":
        kind, reason = "merged", "CPU"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            needed = _dense_bytes(model, target)
            fits = needed <= GPU_FREE_MEMORY_SHARE * free
            kind = "merged" if fits else "4bit"
            reason = (f"GPU, the dense model ({needed / 2**30:.1f} GiB) "
                      f"{'fits' if fits else 'does not fit'} in half the free memory ({free / 2**30:.1f} GiB)")
    with_adapter = merge_adapter and _base_and_adapter(model)[1] is not None
    if kind == "4bit":
        adapter = "adapter" if with_adapter else "no adapter"
        described = f"4-bit layers as trained, {adapter} unmerged on {device} ({reason})"
        log.info("Generation model: %s", described)
        return GenerationModel(model, "4bit", described)
    started = time.perf_counter()
    dense = build_generation_model(model, target, merge_adapter=merge_adapter, device=device)
    layers = list(compat.bitsandbytes.linear_4bit_layers(model).values())
    what = merged_weights(layers[0].weight.quant_type if layers else None, target, with_adapter, device)
    described = f"{what} ({reason}; built in {time.perf_counter() - started:.1f}s)"
    log.info("Generation model: %s", described)
    return GenerationModel(dense, "merged", described, weights=what)
