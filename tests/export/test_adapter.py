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
