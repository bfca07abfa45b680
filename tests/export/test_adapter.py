"""`finsight export`: the adapter folder, the merged model (the trained model's logits), written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import EXPORT_IDS

from finsight.cli.lightning_cli import main

IDS = torch.tensor(EXPORT_IDS)

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


def test_a_merged_export_killed_while_writing_leaves_no_folder_under_its_name(trained, tmp_path):
    """SIGKILL right after the merged model's weights file is written, before the tokenizer: only a hidden
    temporary is left, never a folder that from_pretrained would half-load; the next export replaces it."""
    import subprocess
    import sys

    run, expected = trained
    output = tmp_path / "merged"
    code = ("import os, signal, sys\n"
            "import safetensors.torch as st\n"
            "real = st.save_file\n"
            "def save_then_die(*args, **kwargs):\n"
            "    real(*args, **kwargs)\n"
            "    print('killed after', args[1] if len(args) > 1 else kwargs.get('filename'), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "st.save_file = save_then_die\n"  # before transformers imports it
            "from finsight.__main__ import entry\n"
            f"sys.argv = ['finsight', 'export', '--checkpoint', {str(run['best'])!r}, '--output', {str(output)!r}, "
            "'--merged', 'true']\n"
            "entry()\n")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -9 and "killed after" in killed.stdout, killed.stderr[-3000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith(".merged.tmp-"), left
    assert (tmp_path / left[0] / "model.safetensors").is_file()  # it had been written, under the hidden name
    main(["export", "--checkpoint", str(run["best"]), "--output", str(output), "--merged", "true"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    torch.testing.assert_close(_merged_logits(output), expected, rtol=0, atol=1e-4)


def test_an_adapter_folder_carries_the_run_system_prompt_to_chat_and_export(tmp_path):
    """finsight_run.json beside the adapter is read back as the run's settings (chat's and export's system
    prompt); a folder without it has none, and the chat then falls back to finsight's own prompt."""
    import json

    from finsight.inference.weights import ADAPTER_RUN_SETTINGS, TrainedWeights
    from finsight.model.settings import QuantizationSettings

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/base"}))
    settings = QuantizationSettings()
    assert TrainedWeights.of_adapter(folder, settings).run_settings == {}
    (folder / ADAPTER_RUN_SETTINGS).write_text(json.dumps({"data.system_prompt": ""}))
    assert TrainedWeights.of_adapter(folder, settings).run_settings == {"data.system_prompt": ""}
