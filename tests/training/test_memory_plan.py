"""The memory plan: what a rank holds, counted on a real 4-bit LoRA model, and the same arithmetic from the
model's config alone (the plan for a model too large to load) agreeing with the count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finsight.model.loading import load_peft_model
from finsight.model.settings import LoraSettings, MemorySettings, QuantizationSettings
from finsight.training.memory_plan import measured_rank_memory, planned_rank_memory, quant_state_bytes


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_peft_model(str(tiny_model_dir), QuantizationSettings(), LoraSettings(r=8, alpha=16),
                           MemorySettings())


def test_the_plan_from_the_config_matches_what_a_rank_really_holds(loaded):
    """One process, no DeepSpeed: the base (4-bit halves of bytes, float32 embeddings and norms), the adapter
    and the 4-bit scales counted on the loaded model equal the arithmetic on its config."""
    model = loaded.model
    strategy = SimpleNamespace(root_device=torch.device("cpu"), world_size=1, config=None)
    measured = measured_rank_memory(model, strategy, model.config, (2, 64), 4)
    planned = planned_rank_memory(model.config, ranks=1, stage=2, offload_param=False, offload_optimizer=False,
                                  lora_rank=8, micro_batch=(2, 64), compute_bytes=4)
    assert measured.base_bytes == planned.base_bytes
    assert measured.adapter_bytes == planned.adapter_bytes == 4 * loaded.trainable_parameters
    # The plan leaves out each layer's two small code books (16 and 256 float32 values).
    layers = 7 * model.config.num_hidden_layers
    assert measured.quant_state_bytes == pytest.approx(planned.quant_state_bytes + layers * (16 + 256) * 4, rel=0.02)
    assert measured.optimizer_bytes == 8 * loaded.trainable_parameters  # AdamW's two moments, no master copy
    assert not measured.partitioned and measured.base_device == "cpu"


def test_each_4bit_layer_is_counted_once(loaded):
    """PEFT's LoRA layer exposes its base layer's weight (and its quantization state) as its own."""
    import bitsandbytes as bnb

    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    states = [layer.weight.quant_state for layer in layers]
    expected = sum(s.absmax.numel() * s.absmax.element_size() + s.code.numel() * s.code.element_size()
                   + s.state2.absmax.numel() * s.state2.absmax.element_size()
                   + s.state2.code.numel() * s.state2.code.element_size() for s in states)
    assert quant_state_bytes(loaded.model) == expected > 0


def test_zero3_divides_the_base_and_parameter_offload_moves_it_to_the_host():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000)
    whole = planned_rank_memory(config, ranks=2, stage=2, offload_param=False, offload_optimizer=True, lora_rank=16,
                                micro_batch=(1, 512))
    sharded = planned_rank_memory(config, ranks=2, stage=3, offload_param=True, offload_optimizer=True, lora_rank=16,
                                  micro_batch=(1, 512))
    assert sharded.base_bytes == whole.base_bytes // 2 and sharded.base_device == "cpu" and whole.base_device == "gpu"
    assert sharded.quant_state_bytes == whole.quant_state_bytes  # not parameters: whole on every rank
    assert sharded.optimizer_bytes == whole.optimizer_bytes  # ZeRO partitions optimizer state in both stages
