"""The one way to a generation model: a checkpoint, its exported adapter and the training model give the same one."""

from __future__ import annotations

import pytest
import torch
from helpers import sampled_fit

from finsight.checkpoint_files import CheckpointContentError, CheckpointError
from finsight.inference.generation_model import get_generation_model
from finsight.inference.weights import TrainedWeights, WeightsSourceError
from finsight.model.settings import QuantizationSettings
from finsight.training.module import FinSightModule

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 100, 200]])
FLOAT32 = {"compute_dtype": "float32", "attn_implementation": "sdpa"}


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**model.state_dict(), **dict(model.named_buffers())}


def _assert_same_tensors(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    return sampled_fit(tiny_model_dir, tmp_path_factory)


def test_a_checkpoint_and_its_exported_adapter_give_the_same_merged_model(run):
    # The best checkpoint is what fit exported as the adapter: read from either, the same tensors.
    from_checkpoint = TrainedWeights.of_checkpoint(run["best"], FLOAT32)
    settings = from_checkpoint.settings
    assert settings == QuantizationSettings(kind="nf4", double_quant=True, **FLOAT32)
    from_adapter = TrainedWeights.of_adapter(run["adapter"], settings)
    assert from_checkpoint.reference == from_adapter.reference
    ours = get_generation_model(from_checkpoint, cache=False)
    theirs = get_generation_model(from_adapter, cache=False)
    assert ours.kind == theirs.kind == "merged"
    assert ours.weights == theirs.weights == "NF4 weights dequantized to float32 with the adapter merged, on cpu"
    _assert_same_tensors(ours.model, theirs.model)
    # ... and the training model's own merge (``finsight test``, the samples) is that model too.
    module = FinSightModule.from_checkpoint(run["best"], **FLOAT32)
    _assert_same_tensors(get_generation_model(module.model).model, ours.model)
    # The adapter is in it: the base alone differs.
    base = get_generation_model(from_checkpoint, merge_adapter=False, cache=False)
    assert "without adapter" in base.weights
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.model.state_dict()[name], ours.model.state_dict()[name])


def test_the_4bit_route_from_a_checkpoint_is_the_training_model(run):
    # --inference 4bit (and every GPU) loads the model as training holds it: the same logits as the module.
    generator = get_generation_model(TrainedWeights.of_checkpoint(run["best"], FLOAT32), inference="4bit")
    assert generator.kind == "4bit"
    module = FinSightModule.from_checkpoint(run["best"], **FLOAT32)
    with torch.no_grad():
        assert torch.equal(generator.model(input_ids=IDS).logits, module.model(input_ids=IDS).logits)


def test_sources_that_cannot_be_used_are_named(run, tmp_path):
    with pytest.raises(WeightsSourceError, match="has no adapter_config.json"):
        TrainedWeights.of_adapter(tmp_path, QuantizationSettings())
    (tmp_path / "damaged.ckpt").write_bytes(run["best"].read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        TrainedWeights.of_checkpoint(tmp_path / "damaged.ckpt")
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=False)
    name = next(k for k in checkpoint["state_dict"] if "lora_A" in k)
    checkpoint["state_dict"][name.replace("layers.0.", "layers.99.")] = checkpoint["state_dict"][name]
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointContentError, match="holds weights this model does not have: .*layers.99"):
        get_generation_model(TrainedWeights.of_checkpoint(tmp_path / "foreign.ckpt", FLOAT32), cache=False)
    del checkpoint["hyper_parameters"]["model_name"]
    torch.save(checkpoint, tmp_path / "nameless.ckpt")
    with pytest.raises(CheckpointContentError, match="names no base model"):
        TrainedWeights.of_checkpoint(tmp_path / "nameless.ckpt")
