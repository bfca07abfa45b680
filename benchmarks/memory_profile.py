"""Peak resident memory of a ``finsight fit`` run, phase by phase: where the peak RSS comes from.

    python benchmarks/memory_profile.py -- --config configs/quickstart.yaml --trainer.max_steps 4

Everything after ``--`` is the ``finsight`` command line (``fit`` is implied). The run happens in this
process, as the ``finsight`` command runs it, while a thread samples the process's resident set size
every 10 ms; a Lightning callback marks the phases (data preparation, model loading, each training
step, validation, checkpoint writing, the adapter export at the end). The report gives, per phase, the
RSS when it started and the highest RSS seen during it, and the process's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil

MIB = 2**20


class RssSampler:
    """Samples this process's RSS in a thread and attributes every sample to the phase running then."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.phase = "start-up"
        self.phases: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.mark("start-up")

    def mark(self, phase: str) -> None:
        """A new phase begins (a phase seen again, such as a later validation, keeps its highest peak)."""
        if phase == self.phase and phase in self.phases:
            return
        rss = self.process.memory_info().rss / MIB
        entry = self.phases.setdefault(phase, {"start_mib": rss, "peak_mib": rss, "seconds": 0.0})
        entry["_since"] = time.perf_counter()
        previous = self.phases.get(self.phase)
        if previous is not None and previous is not entry and "_since" in previous:
            previous["seconds"] += time.perf_counter() - previous.pop("_since")
        self.phase = phase

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.process.memory_info().rss / MIB
            entry = self.phases[self.phase]
            entry["peak_mib"] = max(entry["peak_mib"], rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mark("end")
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        """Phases in order with their start and peak RSS, plus ``ru_maxrss``."""
        import resource

        phases = {name: {k: round(v, 1) for k, v in entry.items() if not k.startswith("_")}
                  for name, entry in self.phases.items()}
        return {"phases": phases, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


SAMPLER: RssSampler | None = None


class PhaseMarks(L.Callback):
    """Tells the sampler which phase of a ``fit`` is running (added to the command line by ``main``)."""

    def __init__(self, first_steps: int = 3) -> None:
        """
        Args:
            first_steps: Training steps reported one by one; later steps share one row.
        """
        self.first_steps = first_steps

    def _mark(self, phase: str) -> None:
        if SAMPLER is not None:
            SAMPLER.mark(phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._mark("data preparation and model loading")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("optimizer and loaders")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("validation")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step + 1
        self._mark(f"training step {step}" if step <= self.first_steps else f"training steps {self.first_steps + 1}+")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("validation")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("checkpoint writing")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._mark("checkpoint writing")  # every_n_train_steps checkpoints are written here; else idle

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit end: best adapter loaded and exported")


def table(report: dict[str, Any]) -> str:
    """The phases as a Markdown table."""
    lines = ["| phase | RSS at start (MiB) | peak RSS (MiB) | seconds |", "|---|---:|---:|---:|"]
    for name, entry in report["phases"].items():
        if name == "end":
            continue
        lines.append(f"| {name} | {entry['start_mib']:,.0f} | {entry['peak_mib']:,.0f} | {entry['seconds']:.1f} |")
    lines.append(f"\nru_maxrss of the process: {report['ru_maxrss_mib']:,.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``finsight fit`` with the given arguments under the sampler and print the phase table."""
    global SAMPLER
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, cli_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = parser.parse_args(ours)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with RssSampler() as sampler:
        SAMPLER = sampler
        import memory_profile  # the module the CLI imports PhaseMarks from (this file may run as __main__)

        memory_profile.SAMPLER = sampler
        from finsight.cli.lightning_cli import main as finsight_main

        sampler.mark("imports and config")
        finsight_main(["fit", *cli_args, "--trainer.callbacks+=memory_profile.PhaseMarks"])
    report = sampler.report()
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
