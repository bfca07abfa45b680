"""A config asking for hardware the machine lacks stops in one line before anything loads: a GPU on a machine
without one (this one, and CI's), more GPUs than there are (a one-GPU machine, simulated), flash-attn without
its package or without CUDA."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from helpers import CONFIG_DIR, error_lines, files_under, run_entry

from finsight import compat
from finsight.training.hardware import hardware_problem, requested_device_count

NO_GPU = ("trainer.accelerator 'gpu' asks for a GPU and this machine has none (torch sees no CUDA device; a CPU "
          "build of torch never does): use --trainer.accelerator cpu, or configs/quickstart.yaml, which is made "
          "for a CPU")


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_methodology_config_on_a_machine_without_a_gpu_is_one_line(without_cuda, tmp_path, monkeypatch, capsys):
    """``configs/finsight.yaml`` asks for a GPU; on this machine the command ends before any model, data or run
    folder, in one line (no Lightning ``MisconfigurationException`` traceback)."""
    status, stderr = run_entry(monkeypatch, capsys, [
        "fit", "--config", str(CONFIG_DIR / "finsight.yaml"),
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    assert status == 1
    assert error_lines(stderr) == [f"error: {NO_GPU}"]
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(("devices", "count"), [(2, 2), ("2", 2), ("0,1", 2), ([0, 1, 2], 3), ("auto", None),
                                                ("-1", None), (-1, None)])
def test_every_form_of_trainer_devices_is_counted(devices, count):
    assert requested_device_count(devices) == count


def test_more_gpus_than_the_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert hardware_problem({"accelerator": "gpu", "devices": "0,1"}, {}) == (
        "trainer.devices 2 asks for more GPUs than this machine has (1): use --trainer.devices 1, or "
        "--trainer.num_nodes for several machines")
    assert hardware_problem({"accelerator": "cuda", "devices": 1}, {}) is None
    assert hardware_problem({"accelerator": "cpu", "devices": 4}, {}) is None  # CPU devices are processes


def test_flash_attention_without_its_package_or_without_cuda(without_cuda, monkeypatch):
    trainer = {"accelerator": "cpu", "devices": 1}
    assert hardware_problem(trainer, {"attn_implementation": "sdpa"}) is None
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "flash_attn" else find_spec(name, *args))
    assert hardware_problem(trainer, {"attn_implementation": "flash_attention_2"}) == (
        "model.attn_implementation 'flash_attention_2' needs the flash-attn package, which is not installed: "
        "pip install 'finsight[flash]' on a CUDA machine, or use auto (sdpa here)")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name == "flash_attn"
                        else find_spec(name, *args))
    assert hardware_problem(trainer, {"attn_implementation": "flash_attention_2"}) == (
        "model.attn_implementation 'flash_attention_2' needs a CUDA GPU and this machine has none: use auto "
        "(sdpa here)")


def test_flash_attention_requested_here_stops_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("this machine can run flash-attn")
    status, stderr = run_entry(monkeypatch, capsys, [
        "fit", "--config", str(CONFIG_DIR / "quickstart.yaml"), f"--model.model_name={tiny_model_dir}",
        "--model.attn_implementation=flash_attention_2", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    assert status == 1
    (line,) = error_lines(stderr)
    assert line.startswith("error: model.attn_implementation 'flash_attention_2' needs ")
    assert files_under(tmp_path) == []
    assert "flash_attn" not in sys.modules


@pytest.mark.parametrize(("precision", "compute_dtype", "setting", "alternative"), [
    ("bf16-mixed", "auto", "trainer.precision 'bf16-mixed'", "--trainer.precision 32-true (or null"),
    ("bf16-true", "auto", "trainer.precision 'bf16-true'", "--trainer.precision 32-true (or null"),
    (None, "bfloat16", "model.compute_dtype 'bfloat16'", "--model.compute_dtype float32 (or auto"),
])
def test_bf16_on_a_cpu_that_only_emulates_it(without_cuda, monkeypatch, precision, compute_dtype, setting,
                                               alternative):
    """An AVX2 CPU (simulated: the detection answers as on one) refuses bf16; a bf16 CPU and the automatic
    choices run."""
    trainer, model = {"accelerator": "cpu", "precision": precision}, {"compute_dtype": compute_dtype}
    monkeypatch.setattr(compat.torch, "cpu_has_native_bf16", lambda: (False, "AVX2"))
    assert hardware_problem(trainer, model) == (
        f"{setting} asks for bfloat16, which this CPU (AVX2) only emulates, several times slower than float32: "
        f"use {alternative}, which follows the hardware), or a CPU with AVX512-BF16 or AMX")
    assert hardware_problem({**trainer, "accelerator": "auto"}, model) is not None  # auto without CUDA: the CPU
    assert hardware_problem({"accelerator": "cpu", "precision": None}, {"compute_dtype": "auto"}) is None
    assert hardware_problem({"accelerator": "cpu", "precision": "32-true"}, {"compute_dtype": "float32"}) is None
    monkeypatch.setattr(compat.torch, "cpu_has_native_bf16", lambda: (True, "AMX"))
    assert hardware_problem(trainer, model) is None


def test_bf16_on_an_avx2_cpu_stops_the_command_in_one_line(without_cuda, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compat.torch, "cpu_has_native_bf16", lambda: (False, "AVX2"))
    status, stderr = run_entry(monkeypatch, capsys, [
        "fit", "--config", str(CONFIG_DIR / "quickstart.yaml"), "--trainer.precision", "bf16-mixed",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"])
    assert status == 1
    assert error_lines(stderr) == [
        "error: trainer.precision 'bf16-mixed' asks for bfloat16, which this CPU (AVX2) only emulates, several "
        "times slower than float32: use --trainer.precision 32-true (or null, which follows the hardware), or a "
        "CPU with AVX512-BF16 or AMX"]
    assert files_under(tmp_path) == []
