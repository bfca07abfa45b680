"""Tables on the documentation site that finsight computes, so they cannot drift from the code: the memory plan
of every shipped config (``docs/gpu.md``) and the catalogue of errors (``docs/troubleshooting.md``).

    python tests/docs_tables.py     # rewrite both tables in place

Each table sits between ``<!-- name -->`` and ``<!-- /name -->`` markers; ``tests/test_docs.py`` fails when a
committed table differs from what this module computes now.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = Path("docs/model_configs")
# (the command line after `finsight plan`, the model config it is planned with). The quickstart row pins the
# precision and recomputation that its `null`/`auto` choose on an AVX2 CPU with room, so the table does not
# depend on the machine that computes it.
PLANNED_COMMANDS = (
    ("--config configs/quickstart.yaml --trainer.precision 32-true --model.gradient_checkpointing false",
     "SmolLM2-135M-Instruct.json"),
    ("--config configs/finsight.yaml", "SmolLM2-1.7B-Instruct.json"),
    ("--config configs/finsight.yaml --config configs/llama2-7b.yaml", "Llama-2-7b-chat-hf.json"),
    ("--config configs/finsight.yaml --config configs/mistral-7b.yaml", "Mistral-7B-Instruct-v0.2.json"),
    ("--config configs/finsight.yaml --config configs/deepspeed_zero2_offload.yaml --trainer.devices 4",
     "SmolLM2-1.7B-Instruct.json"),
    ("--config configs/finsight.yaml --config configs/deepspeed_zero3_offload.yaml --trainer.devices 2",
     "SmolLM2-1.7B-Instruct.json"),
    ("--config configs/finsight.yaml --config configs/llama2-7b.yaml --config configs/deepspeed_zero3_offload.yaml "
     "--trainer.devices 2", "Llama-2-7b-chat-hf.json"),
)


def gib(count: float) -> str:
    """GiB with one decimal, as the table gives every size."""
    return f"{count / 2**30:.1f}"


def plan_table() -> str:
    """The memory plan of every shipped config, from ``finsight plan``'s own function: which command each row
    is, then its numbers (two tables, so that neither is wider than the page)."""
    from finsight.cli.lightning_cli import main

    commands = ["| row | `finsight plan ...` | model | devices |", "|---|---|---|---|"]
    sizes = ["| row | per GPU | host RAM per rank | base + scales | adapter + gradients | optimizer | activations |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row, (command, model_config) in zip("ABCDEFGHIJ", PLANNED_COMMANDS, strict=False):
        with contextlib.redirect_stdout(io.StringIO()):
            plan = main(["plan", *command.split(), "--model_config", str(MODEL_CONFIGS / model_config)])
        memory = plan.memory
        commands.append(f"| {row} | `{command}` | {model_config.removesuffix('.json')} | "
                        f"{plan.ranks} × {plan.device.upper()} |")
        per_gpu = gib(plan.device_bytes) if plan.device == "gpu" else "-"
        sizes.append(f"| {row} | {per_gpu} | {gib(plan.host_bytes)} | "
                     f"{gib(memory.base_bytes + memory.quant_state_bytes)} | "
                     f"{gib(memory.adapter_bytes + memory.gradient_bytes)} | {gib(memory.optimizer_bytes)} | "
                     f"{gib(memory.activation_bytes)} |")
    return "\n".join([*commands, "", "Sizes in GiB per rank:", "", *sizes])


def error_table() -> str:
    """Every error finsight raises, from the error classes and the messages of their raise sites."""
    from finsight.errors import error_catalogue_markdown

    return error_catalogue_markdown()


TABLES = {"docs/gpu.md": ("memory-plan", plan_table), "docs/troubleshooting.md": ("errors", error_table)}


def marked_block(text: str, name: str) -> str | None:
    """The text between ``<!-- name -->`` and ``<!-- /name -->``, without the newlines at its ends."""
    match = re.search(rf"<!-- {name} -->\n(.*?)\n<!-- /{name} -->", text, re.S)
    return match.group(1) if match else None


def write() -> None:
    """Rewrite every computed table in place."""
    for page, (name, compute) in TABLES.items():
        path = ROOT / page
        text = path.read_text(encoding="utf-8")
        if marked_block(text, name) is None:
            sys.exit(f"{page}: no <!-- {name} --> ... <!-- /{name} --> block")
        table = compute()
        path.write_text(re.sub(rf"(<!-- {name} -->\n).*?(\n<!-- /{name} -->)",
                               lambda m, table=table: m.group(1) + table + m.group(2), text, flags=re.S), encoding="utf-8")
        print(f"{page}: {name} rewritten")


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    write()
