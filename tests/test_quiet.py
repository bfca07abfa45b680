"""A training run prints its own lines, not third-party tips and deprecation warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the tested library versions printed on every run before they were fixed or filtered.
KNOWN_NOISE = (
    "litlogger",
    "is_gradient_checkpointing",
    "gradient_checkpointing_enable",
    "set_vital",
    "LeafSpec",
    "Flattening the indices",
    "Saving the dataset",
    "Setting accelerator to CPU",  # DeepSpeed, imported when the fit saves the chat's model
)


def test_a_short_fit_prints_no_known_noise_and_no_warning(tiny_model_dir, tmp_path):
    # Activation checkpointing on, and the quickstart's start-up summary and progress bar: every path that
    # used to print noise runs.
    command = [sys.executable, "-m", "finsight", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
               f"--model.model_name={tiny_model_dir}", "--model.gradient_checkpointing=true",
               "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
               "--data.max_length=512", "--data.num_proc=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}  # every warning shown once
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "FinSight run" in output and "FinSight data report" in output and "Adapter written" in output
    assert "Chat model cached in" in output  # the end of a CPU fit prepares the first chat's model quietly too
    for noise in KNOWN_NOISE:
        assert noise not in output, noise
    warnings = [line for line in output.splitlines() if "Warning:" in line or "deprecated" in line]
    assert not warnings
