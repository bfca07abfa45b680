"""``finsight plan`` against the memory a real run takes: the plan's host total beside the measured growth of
resident memory from before the model loads to the peak of the training steps.

    python benchmarks/plan_check.py [--steps 3]

Each setting runs the quickstart (SmolLM2-135M, real 4-bit QLoRA) in its own process under
``benchmarks/memory_profile.py``, and ``finsight plan`` on the same command line. The plan counts the base,
4-bit scales, adapter, its gradients, optimizer state and one micro-batch's activations (logits as if every
position were trained); the measured growth also holds the allocator's and Python's own overhead, so it should
be near the plan, above it by a few hundred MiB at most, and never far below it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = (
    ("float32, no recomputation, 2 x 384", ["--trainer.precision", "32-true",
                                             "--model.gradient_checkpointing", "false"]),
    ("float32, every layer recomputes, 2 x 384", ["--trainer.precision", "32-true",
                                                   "--model.gradient_checkpointing", "true"]),
    ("float32, no recomputation, 4 x 384", ["--trainer.precision", "32-true", "--model.gradient_checkpointing",
                                             "false", "--data.batch_size", "4"]),
)
MIB = 2**20


def planned_host_mib(overrides: list[str]) -> float:
    """The plan's host total for the quickstart with these overrides, from ``finsight plan`` in-process."""
    from finsight.cli.lightning_cli import main

    return main(["plan", "--config", "configs/quickstart.yaml", *overrides]).host_bytes / MIB


def measured_growth_mib(overrides: list[str], steps: int, out: Path) -> float:
    """Peak RSS of the training steps minus the RSS before data preparation and model loading."""
    report = out / "report.json"
    command = [sys.executable, "benchmarks/memory_profile.py", "--json", str(report), "--",
               "--config", "configs/quickstart.yaml", *overrides, f"--trainer.max_steps={steps}",
               "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
               f"--trainer.logger.init_args.save_dir={out}", "--adapter_export.cache_chat_model=false"]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    phases = json.loads(report.read_text())["phases"]
    before = phases["data preparation and model loading"]["start_mib"]
    peak = max(entry["peak_mib"] for name, entry in phases.items() if name.startswith("training step"))
    return peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.chdir(ROOT)
    cpu = next((flag for flag in ("amx_bf16", "avx512_bf16", "avx2") if flag in Path("/proc/cpuinfo").read_text()),
               "?")
    rows = ["| quickstart setting | planned, MiB | measured RSS growth, MiB | measured / planned |",
            "|---|---:|---:|---:|"]
    for label, overrides in SETTINGS:
        planned = planned_host_mib(overrides)
        with tempfile.TemporaryDirectory() as out:
            measured = measured_growth_mib(overrides, args.steps, Path(out))
        rows.append(f"| {label} | {planned:,.0f} | {measured:,.0f} | {measured / planned:.2f} |")
        print(rows[-1], flush=True)
    print(f"\nCPU: {os.cpu_count()} cores, best of amx_bf16/avx512_bf16/avx2: {cpu}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
