"""finsight side by side with TRL's ``SFTTrainer``: same model, data, LoRA, optimizer, schedule and batches.

    python benchmarks/compare.py --model tiny
    python benchmarks/compare.py --help     # every option, and how TRL is set up and why

The code is the ``finbench`` package beside this file: ``harness`` (settings, presets, step probe, the
subprocess runner), ``finsight_runner``, ``trl_runner``, ``flops`` (Lightning's FLOP counter), ``report``
and ``cli``. Each measurement runs this script again as ``--child SPEC`` in its own process.
"""

from finbench.cli import entry

if __name__ == "__main__":
    entry()
