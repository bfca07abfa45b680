"""The settings objects: built from the flat config keys users write, with the defaults of old checkpoints."""

from __future__ import annotations

import pytest
import yaml
from helpers import CONFIG_DIR

from finsight import FinSightModule
from finsight.model.settings import (
    DEFAULT_TARGET_MODULES,
    NF4,
    LoraSettings,
    MemorySettings,
    QuantizationSettings,
)


@pytest.mark.parametrize("config", ["quickstart.yaml", "finsight.yaml"])
def test_each_config_s_flat_model_keys_build_the_settings(config):
    model = yaml.safe_load((CONFIG_DIR / config).read_text())["model"]
    flat = {**model.get("init_args", model), "compute_dtype": "bfloat16"}  # resolved by the module at load
    quantization = QuantizationSettings.from_hparams(flat)
    assert (quantization.kind, quantization.double_quant) == (flat.get("quantization", "nf4"),
                                                              flat.get("double_quant", True))
    assert quantization.compute_dtype == "bfloat16"
    lora = LoraSettings.from_hparams(flat)
    assert (lora.r, lora.alpha, lora.dropout) == (flat["lora_r"], flat["lora_alpha"], flat["lora_dropout"])
    assert lora.target_modules == tuple(flat.get("target_modules") or DEFAULT_TARGET_MODULES)
    memory = MemorySettings.from_hparams(flat)
    assert memory.gradient_checkpointing == flat["gradient_checkpointing"]
    assert memory.release_freed_memory == flat.get("release_freed_memory", "auto")


def test_the_module_hands_its_hyper_parameters_over_as_settings():
    module = FinSightModule(model_name="x", quantization="fp4", double_quant=False, compute_dtype="float16",
                            attn_implementation="eager", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                            target_modules=["q_proj"], gradient_checkpointing="auto", activation_budget_gib=0.5)
    assert module.quantization_settings == QuantizationSettings("fp4", False, "float16", "eager")
    assert LoraSettings.from_hparams(module.hparams) == LoraSettings(4, 8, 0.0, ("q_proj",))
    assert MemorySettings.from_hparams(module.hparams) == MemorySettings("auto", "auto", 0.5)


def test_a_checkpoint_without_the_newer_keys_gets_the_defaults_and_the_key_ignores_attention():
    old = {"model_name": "x", "quantization": "nf4", "compute_dtype": "float32", "lora_r": 64}
    assert QuantizationSettings.from_hparams(old) == NF4
    assert MemorySettings.from_hparams(old) == MemorySettings()
    assert NF4.key() == {"quantization": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert NF4.replace(attn_implementation="sdpa").key() == NF4.key()  # the kernel does not change the weights
    assert NF4.replace(kind="none").quantized is False and NF4.quantized
