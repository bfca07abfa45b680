"""Memory choices: gradient checkpointing's ``auto`` chooses by device and memory and never changes what is
learned; freed activations go back to the OS."""

from __future__ import annotations

import io
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import TINY_NF4, prepared_datamodule
from rich.console import Console
from transformers import AutoConfig

from finsight import FinSightModule
from finsight.model.lora_dropout import DropoutLoraA
from finsight.model.memory import (
    AUTO_CHECKPOINTING_RAM_SHARE,
    activation_bytes,
    choose_gradient_checkpointing,
)
from finsight.training.monitoring import print_summary


@pytest.fixture(scope="module")
def datamodule(tiny_model_dir):
    """2 x 256 batches of the bundled samples, prepared once for this file."""
    return prepared_datamodule(tiny_model_dir, max_length=256, batch_size=2)


def test_auto_chooses_by_device_and_by_the_activation_estimate_against_free_ram(tiny_model_dir, monkeypatch):
    import psutil

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert choose_gradient_checkpointing(True, config, (4, 512), 4) == (True, "set in the config")
    assert choose_gradient_checkpointing(False, config, (4, 512), 4) == (False, "set in the config")
    on, reason = choose_gradient_checkpointing("auto", config, None, 4)
    assert on and "unknown" in reason

    # 8 GiB free: a micro-batch whose estimate is just under a quarter of it keeps activations, just over recomputes.
    free = 8 * 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": free})())
    per_sample = activation_bytes(config, 1, 1000, 4)
    fits = int(AUTO_CHECKPOINTING_RAM_SHARE * free // per_sample)
    on, reason = choose_gradient_checkpointing("auto", config, (fits, 1000), 4)
    assert not on and "fit" in reason and "8.0 GiB RAM available" in reason
    on, reason = choose_gradient_checkpointing("auto", config, (fits + 1, 1000), 4)
    assert on and "25%" in reason
    # Half-precision activations take half the memory (the one-byte LoRA dropout masks do not shrink).
    assert activation_bytes(config, 2, 1000, 2, lora=False) == activation_bytes(config, 1, 1000, 4, lora=False)
    assert activation_bytes(config, 1, 1000, 2) < per_sample

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on, reason = choose_gradient_checkpointing("auto", config, (1, 8), 4)
    assert on and "CUDA" in reason


def test_activation_estimate_grows_with_batch_length_and_layers(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    one = activation_bytes(config, 1, 100, 4)
    assert activation_bytes(config, 2, 100, 4) == 2 * one
    assert activation_bytes(config, 1, 200, 4) == 2 * one
    config.num_hidden_layers *= 3
    assert activation_bytes(config, 1, 100, 4) == 3 * one
    assert activation_bytes(config, 1, 100, 4, lora=False) < 3 * one


def _loss_and_grads(module: FinSightModule, batch: dict[str, torch.Tensor], monkeypatch) -> tuple:
    with torch.no_grad():  # non-zero LoRA B, so every adapter tensor gets a gradient
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both runs
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_loss_and_gradients_are_the_same_with_and_without_recomputation(tiny_model_dir, datamodule, monkeypatch):
    batch = next(iter(datamodule.train_dataloader()))
    results = []
    for checkpointing in (True, False):
        torch.manual_seed(0)  # the same LoRA initialisation
        module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32", lora_dropout=0.1,
                                gradient_checkpointing=checkpointing)
        module.configure_model()
        assert module.model_info.gradient_checkpointing is checkpointing
        layers = module.model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [checkpointing] * len(layers)
        # Every adapter's dropout is the fused one (finsight.model.lora_dropout), recomputed or not.
        assert sum(isinstance(m, DropoutLoraA) for m in module.model.modules()) == 7 * len(layers)
        results.append(_loss_and_grads(module, batch, monkeypatch))
    (loss_on, grads_on), (loss_off, grads_off) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in grads_on:
        assert grads_on[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_auto_turns_recomputation_off_on_a_cpu_with_room_and_the_summary_says_why(tiny_model_dir, datamodule,
                                                                                   tmp_path, monkeypatch):
    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32", gradient_checkpointing="auto")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    info = module.model_info
    assert info.gradient_checkpointing is False
    assert info.gradient_checkpointing_reason.startswith("auto: CPU and the activations fit")
    assert "2 x 256 micro-batch" in info.gradient_checkpointing_reason
    assert not any(layer.gradient_checkpointing for layer in module.model.get_base_model().model.layers)

    out = io.StringIO()
    monkeypatch.setattr("finsight.training.monitoring.Console", lambda **kwargs: Console(file=out, width=400))
    print_summary(trainer, module)
    row = next(line for line in out.getvalue().splitlines() if "gradient checkpointing" in line)
    assert "off (auto: CPU and the activations fit" in row
    row = next(line for line in out.getvalue().splitlines() if "freed memory to the OS" in line)
    assert "no (auto: gradient checkpointing is off" in row


@pytest.mark.parametrize(("recompute", "release"), [(True, "auto"), (False, "auto"), (False, True), (True, False)])
def test_freed_memory_goes_back_to_the_os_with_recomputation_or_when_asked(tiny_model_dir, monkeypatch, recompute,
                                                                           release):
    # The allocator setting trades step speed for peak memory: by default it follows the memory-bound choice.
    import finsight.model.loading as model_module
    from finsight.model.settings import LoraSettings, MemorySettings

    calls = []
    monkeypatch.setattr("finsight.model.loading.return_freed_memory_to_the_os", lambda: calls.append(True) or True)
    loaded = model_module.load_peft_model(
        str(tiny_model_dir), TINY_NF4, LoraSettings(r=4, alpha=8, dropout=0.0),
        MemorySettings(gradient_checkpointing=recompute, release_freed_memory=release))
    assert loaded.gradient_checkpointing is recompute
    expected = recompute if release == "auto" else release
    assert calls == ([True] if expected else [])
    assert loaded.release_freed_memory is expected
    assert loaded.release_freed_memory_reason == ("set in the config" if release != "auto" else
                                                  f"auto: gradient checkpointing is {'on' if recompute else 'off'}"
                                                  + (", memory is the constraint" if recompute else
                                                     ", speed is the constraint"))


def test_an_activation_budget_recomputes_only_the_layers_that_do_not_fit(tiny_model_dir, datamodule, monkeypatch):
    from finsight.model.memory import layers_to_recompute

    config = AutoConfig.from_pretrained(tiny_model_dir)
    layers = config.num_hidden_layers
    per_layer_gib = activation_bytes(config, 2, 256, 4) / layers / 2**30
    assert layers_to_recompute(config, (2, 256), 4, 0.0)[0] == layers
    assert layers_to_recompute(config, (2, 256), 4, per_layer_gib * 1.01)[0] == layers - 1
    count, reason = layers_to_recompute(config, (2, 256), 4, per_layer_gib * layers)
    assert count == 0 and f"0 of {layers} layers recompute" in reason and "2 x 256 micro-batch" in reason
    assert layers_to_recompute(config, None, 4, 100.0)[0] == layers  # unknown micro-batch: the safe side

    batch = next(iter(datamodule.train_dataloader()))
    results = []
    for budget in (None, per_layer_gib * 1.01):
        torch.manual_seed(0)
        module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32", lora_dropout=0.1,
                                gradient_checkpointing=True, activation_budget_gib=budget)
        monkeypatch.setattr(FinSightModule, "micro_batch", lambda self: (2, 256))
        module.configure_model()
        flags = [layer.gradient_checkpointing for layer in module.model.get_base_model().model.layers]
        assert flags == ([True] * layers if budget is None else [True] * (layers - 1) + [False])
        assert module.model_info.recomputed_layers == (layers if budget is None else layers - 1)
        # Keeping some layers is the speed side: the allocator setting then stays glibc's.
        assert module.model_info.release_freed_memory is (budget is None)
        results.append(_loss_and_grads(module, batch, monkeypatch))
    (loss_all, grads_all), (loss_part, grads_part) = results
    torch.testing.assert_close(loss_all, loss_part, rtol=1e-6, atol=1e-6)
    for name in grads_all:
        torch.testing.assert_close(grads_all[name], grads_part[name], rtol=1e-5, atol=1e-7, msg=name)


FRAGMENTED_HEAP = """
import sys, psutil, torch
from finsight.model.memory import return_freed_memory_to_the_os
if sys.argv[1] == "fixed":
    assert return_freed_memory_to_the_os()
big = torch.ones(4 << 20)
del big  # freeing a 16 MiB block raises glibc's mmap threshold above 4 MiB
before = psutil.Process().memory_info().rss
blocks = [torch.ones(1 << 20) for _ in range(100)]  # 100 activation-sized blocks of 4 MiB
pin = torch.ones(128 << 10)  # a live 512 KiB tensor, allocated above them in the heap
del blocks
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activation_sized_blocks_go_back_to_the_os():
    def retained(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP, mode], capture_output=True, text=True,
                             check=True)
        return float(out.stdout.strip().splitlines()[-1])

    # glibc's default keeps the freed 400 MiB resident under the small live tensors; finsight's setting does not.
    assert retained("default") > 300
    assert retained("fixed") < 50
