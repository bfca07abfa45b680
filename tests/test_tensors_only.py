"""Checkpoints are data, never code: poisoned files given to every reader and every command.

Each poisoned file carries a payload whose unpickling would create a marker file; the tests check that the
marker never appears, that the command ends in exactly the expected ``error:`` line with exit status 1, and
that nothing was written. The payloads are built in different ways: an object with ``__reduce__`` in the
hyper-parameters (``os.system``), in the state dict (``subprocess.call``), and a hand-written pickle of a
newer protocol (``STACK_GLOBAL``, which torch's static reader does not parse) swapped into a real archive.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import (
    QUICKSTART,
    ShellPayload,
    SubprocessPayload,
    build_tiny_model_folder,
    error_lines,
    expected_refusal,
    files_under,
    run_entry,
    sampled_fit,
    tiny_run_args,
)

from finsight.checkpoint_files import read_checkpoint, verify_checkpoint_file
from finsight.inference.cache import ENTRY_FILE, generation_cache_dir
from finsight.model.loading import load_base_model
from finsight.model.settings import QuantizationSettings
from finsight.references import ModelReferenceError
from finsight.tensors_only import (
    FORCE_VARIABLE,
    UNSAFE_VARIABLE,
    UnsafeCheckpointError,
    check_tensors_only,
    tensors_only,
)
from finsight.training.module import FinSightModule

QUESTION = "What is an expense ratio?"


def poison_hyper_parameters(source: Path, target: Path, marker: Path) -> Path:
    """A copy of a finsight checkpoint with one extra hyper-parameter whose unpickling runs a shell command."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = ShellPayload(marker)
    torch.save(checkpoint, target)
    return target


def poison_state_dict(source: Path, target: Path, marker: Path) -> Path:
    """A copy whose state dict holds a payload beside the adapter tensors (``subprocess.call``)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["extra"] = SubprocessPayload(marker)
    torch.save(checkpoint, target)
    return target


def poison_with_protocol_4(source: Path, target: Path, marker: Path) -> Path:
    """The archive of ``source`` with its ``data.pkl`` replaced by a protocol-4 pickle of a payload."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as poisoned:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps({"hyper_parameters": {"note": ShellPayload(marker)}}, protocol=4)
            poisoned.writestr(info, data)
    return target


POISONS = {"os.system in hyper_parameters": (poison_hyper_parameters, "posix.system"),
           "subprocess.call in state_dict": (poison_state_dict, "commands.call"),
           "protocol 4 pickle": (poison_with_protocol_4, "posix.system")}


# ----------------------------------------------------------------------------------- the loader itself


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "hyper_parameters": {"lr": 1e-4, "names": ["a", "b"]}}, path)
    return path


@pytest.mark.parametrize("poison", POISONS)
def test_every_load_inside_is_data_only_even_when_the_caller_asks_for_full_unpickling(saved, tmp_path, poison):
    """Lightning and DeepSpeed call ``torch.load(..., weights_only=False)`` themselves; inside the block torch
    refuses the payload anyway, and the refusal names the file."""
    marker = tmp_path / "marker"
    build, what = POISONS[poison]
    poisoned = build(saved, tmp_path / "poisoned.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as refused, tensors_only(poisoned):
        torch.load(poisoned, map_location="cpu", weights_only=False)
    assert str(refused.value).startswith(f"checkpoint {poisoned} holds ")
    if poison != "protocol 4 pickle":  # torch names the global; for an opcode it cannot read, that opcode
        assert f"holds {what}, not tensors" in str(refused.value)
    assert not marker.exists()
    # The static check (run before every load) names the payload in every form.
    with pytest.raises(UnsafeCheckpointError) as checked:
        check_tensors_only(poisoned)
    assert f"error: {checked.value}" == expected_refusal(poisoned, what)
    assert not marker.exists()


def test_torchs_opposite_switch_cannot_reopen_full_unpickling(saved, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    poisoned = poison_hyper_parameters(saved, tmp_path / "poisoned.pt", marker)
    monkeypatch.setenv(UNSAFE_VARIABLE, "1")
    monkeypatch.delenv(FORCE_VARIABLE, raising=False)
    with pytest.raises(UnsafeCheckpointError), tensors_only(poisoned):
        torch.load(poisoned, weights_only=False)
    assert not marker.exists()
    # Outside the block the environment is the user's again.
    assert os.environ[UNSAFE_VARIABLE] == "1" and FORCE_VARIABLE not in os.environ


def test_plain_data_loads_inside_and_the_switch_is_restored(saved, monkeypatch):
    monkeypatch.delenv(FORCE_VARIABLE, raising=False)
    with tensors_only(saved):
        loaded = torch.load(saved, weights_only=False)
        assert os.environ[FORCE_VARIABLE] == "1"
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert loaded["hyper_parameters"] == {"lr": 1e-4, "names": ["a", "b"]}
    assert FORCE_VARIABLE not in os.environ


@pytest.mark.parametrize("poison", POISONS)
def test_the_checkpoint_readers_refuse_before_loading(saved, tmp_path, poison):
    marker = tmp_path / "marker"
    build, what = POISONS[poison]
    poisoned = build(saved, tmp_path / "poisoned.pt", marker)
    for reader in (read_checkpoint, verify_checkpoint_file, FinSightModule.from_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as refused:
            reader(poisoned)
        assert f"error: {refused.value}" == expected_refusal(poisoned, what), reader
    assert not marker.exists()


# ----------------------------------------------------------------------------------- every command


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> dict:
    return sampled_fit(tiny_model_dir, tmp_path_factory)


def command_args(command: str, checkpoint: Path, model_dir: Path, root: Path) -> list[str]:
    if command == "export":
        return ["export", "--checkpoint", str(checkpoint), "--output", str(root / "exported")]
    if command == "chat":
        return ["chat", "--ckpt_path", str(checkpoint), "--prompt", QUESTION, "--max_new_tokens", "4"]
    extra = ["--trainer.max_steps=3"] if command == "fit" else ["--trainer.limit_val_batches=1",
                                                                 "--trainer.limit_test_batches=1",
                                                                 "--trainer.limit_predict_batches=1"]
    return tiny_run_args(command, model_dir, root, *extra, "--ckpt_path", str(checkpoint))


COMMANDS = ["fit", "validate", "test", "predict", "export", "chat"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_poisoned_lightning_checkpoint_in_one_line(run, tiny_model_dir, tmp_path, command,
                                                                          monkeypatch, capsys):
    marker = tmp_path / "marker"
    poisoned = poison_hyper_parameters(run["best"], tmp_path / "shared.ckpt", marker)
    root = tmp_path / "run"
    status, stderr = run_entry(monkeypatch, capsys, command_args(command, poisoned, tiny_model_dir, root))
    assert status == 1
    assert error_lines(stderr) == [expected_refusal(poisoned, "posix.system")]
    assert not marker.exists()
    assert files_under(root) == []  # no log folder, no config.yaml, no export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.ckpt"]


def test_resume_last_refuses_a_poisoned_last_checkpoint_before_writing_anything(run, tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """``--ckpt_path last`` where someone replaced the run's own last.ckpt."""
    marker = tmp_path / "marker"
    root = tmp_path / "run"
    version = root / "lightning_logs" / "quickstart" / "version_0"
    shutil.copytree(run["log_dir"], version)
    last = version / "checkpoints" / "last.ckpt"
    poison_with_protocol_4(run["last"], last, marker)
    before = files_under(root)
    status, stderr = run_entry(monkeypatch, capsys, tiny_run_args("fit", tiny_model_dir, root, "--trainer.max_steps=4",
                                                                  "--ckpt_path", "last"))
    assert status == 1
    assert error_lines(stderr) == [expected_refusal(last, "posix.system")]
    assert not marker.exists()
    assert files_under(root) == before


def test_a_checkpoint_never_chooses_the_class_that_is_built(run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Hyper-parameters are plain data, but ``_class_path`` would make LightningCLI build whatever class (any
    importable callable) the file names, with the file's arguments."""
    marker = tmp_path / "marker"
    checkpoint = torch.load(run["best"], map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(_class_path="subprocess.Popen", args=["touch", str(marker)])
    shared = tmp_path / "shared.ckpt"
    torch.save(checkpoint, shared)
    root = tmp_path / "run"
    for command in ("validate", "test", "predict"):
        status, stderr = run_entry(monkeypatch, capsys, command_args(command, shared, tiny_model_dir, root))
        assert status == 1
        assert error_lines(stderr) == [
            f"error: checkpoint {shared} names a model class of its own ('subprocess.Popen'); finsight builds "
            "FinSightModule and takes only its options' values from a checkpoint, never a class it names: nothing "
            "was imported; use a checkpoint written by finsight fit"]
    assert not marker.exists()
    assert files_under(root) == []


def test_chat_refuses_an_adapter_folder_with_a_poisoned_pickle(run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(run["adapter"] / "adapter_config.json", adapter)
    torch.save({"weights": SubprocessPayload(marker)}, adapter / "adapter_model.bin")
    status, stderr = run_entry(monkeypatch, capsys, ["chat", "--adapter", str(adapter), "--prompt", QUESTION])
    assert status == 1
    assert error_lines(stderr) == [expected_refusal(adapter / "adapter_model.bin", "commands.call")]
    assert not marker.exists()


def test_chat_refuses_a_cache_entry_that_holds_a_pickle(run, tmp_path, monkeypatch, capsys):
    """The chat's cached merged model (safetensors and JSON when finsight writes it) with a pickled
    pytorch_model.bin in place of its safetensors file."""
    monkeypatch.setenv("FINSIGHT_CACHE", str(tmp_path / "cache"))
    args = ["chat", "--adapter", str(run["adapter"]), "--prompt", QUESTION, "--max_new_tokens", "4"]
    status, stderr = run_entry(monkeypatch, capsys, args)
    assert status == 0, stderr[-2000:]
    (entry_folder,) = [p for p in generation_cache_dir().iterdir() if (p / ENTRY_FILE).is_file()]
    marker = tmp_path / "marker"
    weights = next(entry_folder.glob("*.safetensors"))
    weights.unlink()
    torch.save({"model": ShellPayload(marker)}, entry_folder / "pytorch_model.bin")
    before = files_under(entry_folder)
    status, stderr = run_entry(monkeypatch, capsys, args)
    assert status == 1
    assert error_lines(stderr) == [
        f"error: generation cache entry {entry_folder} holds pytorch_model.bin, which finsight never writes there "
        f"(only safetensors and JSON): refused, nothing in it was run; remove the entry (rm -r {entry_folder}) and "
        "check who can write to the cache folder"]
    assert not marker.exists()
    assert files_under(entry_folder) == before  # left as found


def test_finsights_own_checkpoints_load_as_data_only(run, tmp_path):
    """Nothing finsight writes needs full unpickling: every file of the run passes the static check and a
    forced data-only load."""
    files = sorted(run["log_dir"].rglob("*.ckpt"))
    assert len(files) >= 2
    for file in files:
        verify_checkpoint_file(file)
        with tensors_only(file):
            assert torch.load(file, map_location="cpu", weights_only=False)["state_dict"]


# ----------------------------------------------------------------------------------- no code from model folders


def test_a_model_folder_never_runs_its_own_code(tiny_tokenizer, tmp_path):
    """``auto_map`` in config.json points at a modeling file that would create a marker when imported:
    with a known architecture transformers' own class is used and the file is never imported; with an
    unknown one finsight refuses in one line. trust_remote_code stays off."""
    marker = tmp_path / "marker"
    folder = build_tiny_model_folder(tmp_path / "model", tiny_tokenizer)
    (folder / "modeling_remote.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                               "from transformers import LlamaForCausalLM as RemoteModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.RemoteModel"}
    (folder / "config.json").write_text(json.dumps(config))
    settings = QuantizationSettings(kind="none", compute_dtype="float32")
    model, _, _ = load_base_model(str(folder), settings)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()

    config["model_type"] = "remote-only"
    config["auto_map"]["AutoConfig"] = "modeling_remote.RemoteConfig"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelReferenceError) as refused:
        load_base_model(str(folder), settings)
    assert str(refused.value).startswith(f"model {str(folder)!r} needs its own Python code")
    assert not marker.exists()


def test_no_finsight_code_turns_trust_remote_code_on():
    package = Path(__file__).resolve().parent.parent / "finsight"
    calls = [f"{path.name}: {line.strip()}" for path in package.rglob("*.py")
             for line in path.read_text().splitlines() if "trust_remote_code=" in line]
    assert calls and all("trust_remote_code=False" in call for call in calls), calls


def test_the_quickstart_pins_its_model_file():
    import yaml

    reference = yaml.safe_load(QUICKSTART.read_text())["model"]["model_name"]
    assert reference.startswith("pypi:") and "#sha256=" in reference
    assert len(reference.split("#sha256=")[1]) == 64
