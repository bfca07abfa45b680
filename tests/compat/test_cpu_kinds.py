"""QLoRA trains the same gradients on every kind of CPU: bitsandbytes' AVX512-BF16 path included.

On a CPU with AVX512-BF16, bitsandbytes converts a 4-bit weight into its CPU packing format at the first
eval-mode forward without gradients, and from then on computes that layer with a kernel that has no
backward (see ``finsight.compat.bitsandbytes.keep_4bit_weights_unpacked``). The oracle here does not depend on the CPU:
the same model with its 4-bit weights dequantized once (bitsandbytes' own ``dequantize_4bit``) into dense
float32 layers gives the gradients a correct QLoRA step must give. Both CPU kinds are run on every machine:
the detection bitsandbytes reads is one function, and where the machine lacks the AVX512-BF16 kernel a
plain-torch stand-in with the same layout (and, like the real one, no backward) takes its place.
"""

from __future__ import annotations

import contextlib
import copy

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from helpers import prepared_datamodule
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from finsight import FinSightModule, compat
from finsight.inference.merge import build_generation_model
from finsight.model.settings import LoraSettings


def _gemv_4bit_stand_in(A: torch.Tensor, B: torch.Tensor, shapeB: list[int], absmax: torch.Tensor,
                        code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes' AVX512-BF16 ``gemv_4bit`` in plain torch: the packed layout read back, bf16 products.

    Computed without autograd: a kernel registered for the CPU key is still traced through otherwise, and
    the real one has no backward (torch's fallback then drops the input's gradient).
    """
    with torch.no_grad():
        return _gemv_4bit_values(A, B, shapeB, absmax, code, blocksize)


def _gemv_4bit_values(A: torch.Tensor, B: torch.Tensor, shapeB: list[int], absmax: torch.Tensor,
                      code: torch.Tensor, blocksize: int) -> torch.Tensor:
    n, k = shapeB
    packed = B.view(torch.uint8).reshape(-1, 32)  # rows of 32 bytes: 32 output rows x 2 inputs, 4 bits each
    indices = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    indices = indices.reshape(n // 32, k // 2, 32, 2).transpose(-3, -2).reshape(n, k).long()
    scales = absmax.to(torch.float32).T.repeat_interleave(blocksize, dim=1)  # absmax is [k / blocksize, n]
    weight = (code[indices] * scales).to(torch.bfloat16).float()
    # bf16 inputs and weights, float32 sums, a bf16 result: the real kernel's roundings.
    out = (A.to(torch.bfloat16).float().reshape(-1, k) @ weight.T).to(torch.bfloat16)
    return out.reshape(*A.shape[:-1], n).to(A.dtype)


@contextlib.contextmanager
def _bitsandbytes_sees(kind: str, monkeypatch):
    """bitsandbytes made to see this CPU kind: its detection answers as that kind would."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: kind == "avx512_bf16")
    library = None
    if kind == "avx512_bf16" and not bnb.functional.has_avx512bf16():
        # This machine has no AVX512-BF16 kernel registered: the stand-in computes what it would.
        library = torch.library.Library("bitsandbytes", "IMPL")
        library.impl("gemv_4bit", _gemv_4bit_stand_in, "CPU")
    try:
        yield kind
    finally:
        if library is not None:
            library._destroy()


@pytest.fixture(params=["avx512_bf16", "avx2"])
def cpu_kind(request, monkeypatch):
    with _bitsandbytes_sees(request.param, monkeypatch) as kind:
        yield kind


class StepRecorder(L.Callback):
    """Each optimizer step's batch, adapter weights before the update, and LoRA gradients."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pl_module.model).items()}
        self.steps.append({"batch": copy.deepcopy(batch), "adapter": adapter})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps[-1]["grads"] = {name: p.grad.detach().clone()
                                   for name, p in pl_module.model.named_parameters() if p.requires_grad}


def _packed_layers(model: torch.nn.Module) -> list[str]:
    """The 4-bit layers whose weight bitsandbytes holds in its CPU packing format (a flag on the quant state)."""
    return [name for name, layer in model.named_modules() if isinstance(layer, bnb.nn.Linear4bit)
            and getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]


def _quantized_state(model: torch.nn.Module) -> dict[str, bytes]:
    """Every 4-bit layer's weight and quantization constants, as bytes."""
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            state[name] = layer.weight.data.numpy().tobytes()
            for key, value in layer.weight.quant_state.as_dict(packed=True).items():
                state[f"{name}.{key}"] = value.numpy().tobytes()
    return state


def _fit_against_the_dense_oracle(model_dir, tmp_path) -> tuple[list[float], bool, list[str]]:
    """A real fit (validation every 2 steps, a checkpoint after each): per step, the LoRA gradient's relative
    distance to the dense oracle's; whether the 4-bit weights ended byte for byte as loaded; packed layers."""
    settings = dict(model_name=str(model_dir), compute_dtype="float32", lora_r=8, lora_alpha=16,
                    lora_dropout=0.0, gradient_checkpointing=False, learning_rate=1e-3, warmup_ratio=0.0)
    module = FinSightModule(**settings)
    module.configure_model()
    loaded = _quantized_state(module.model)
    # The oracle's base: the loaded 4-bit weights dequantized once, dense float32 layers.
    dense = build_generation_model(module.model, torch.float32, merge_adapter=False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LoraSettings.from_hparams(module.hparams).target_modules),
                      task_type="CAUSAL_LM")
    oracle = FinSightModule(**settings)
    oracle.model = get_peft_model(dense, lora).train()

    recorder = StepRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=6, val_check_interval=2,
                        limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[recorder, ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss",
                                                             save_last=True)])
    trainer.fit(module, datamodule=prepared_datamodule(model_dir, max_length=256, batch_size=2))
    assert trainer.global_step == 6 and len(recorder.steps) == 6
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()

    distances = []
    for step in recorder.steps:
        set_peft_model_state_dict(oracle.model, step["adapter"])
        oracle.model.zero_grad()
        oracle.training_step(step["batch"], 0).backward()
        expected = dict(oracle.model.named_parameters())
        ours = torch.cat([g.flatten() for g in step["grads"].values()])
        theirs = torch.cat([expected[name].grad.flatten() for name in step["grads"]])
        distances.append(float(torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs)))
    return distances, _quantized_state(module.model) == loaded, _packed_layers(module.model)


def test_lora_gradients_of_every_step_equal_the_dense_oracles_on_every_cpu_kind(
        cpu_kind, tiny_model_dir, tmp_path):
    distances, unchanged, packed = _fit_against_the_dense_oracle(tiny_model_dir, tmp_path)
    assert max(distances) < 1e-5, distances
    assert unchanged, "the frozen 4-bit weights or constants changed during fit"
    assert packed == []


def test_without_finsights_switch_the_avx512_bf16_path_fails_the_oracle(tiny_model_dir, tmp_path, monkeypatch):
    """The oracle catches the bitsandbytes behaviour it exists for: with the switch made a no-op, the
    simulated (or real) AVX512-BF16 path trains other gradients and changes the frozen constants."""
    monkeypatch.setattr(compat.bitsandbytes, "keep_4bit_weights_unpacked", lambda model: 0)
    with _bitsandbytes_sees("avx512_bf16", monkeypatch):
        distances, unchanged, _ = _fit_against_the_dense_oracle(tiny_model_dir, tmp_path)
    assert max(distances) > 1e-2, distances
    assert not unchanged


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="needs bitsandbytes' real AVX512-BF16 kernel")
def test_the_stand_in_computes_what_the_real_avx512_bf16_kernel_computes():
    """Where the real kernel exists, the simulation used elsewhere agrees with it to one bf16 rounding."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, quantize_4bit

    torch.manual_seed(0)
    for rows, columns in [(64, 128), (128, 64), (96, 256)]:
        weight, state = quantize_4bit(torch.randn(rows, columns), quant_type="nf4", compress_statistics=True)
        packed, state = _convert_weight_packed_for_cpu(weight, state)
        inputs = torch.randn(3, 5, columns)
        real = bnb.functional.gemv_4bit(inputs, packed, state=state)
        ours = _gemv_4bit_stand_in(inputs, packed, list(state.shape), state.absmax, state.code, state.blocksize)
        torch.testing.assert_close(ours, real, rtol=0, atol=float(real.abs().max()) * 2 ** -7)
