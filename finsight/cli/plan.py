"""``finsight plan --config C``: what a config needs on each device and in host RAM, before anything is
downloaded or loaded.

The config is read exactly as ``finsight fit`` reads it (the same parser, ``--config`` files and overrides), but
nothing is built: the model is known by its ``config.json`` alone (read from a local folder or GGUF file, fetched
from the Hub without its weights, or given with ``--model_config``), and the arithmetic is
:func:`~finsight.training.memory_plan.planned_rank_memory`, the planner whose measured twin the run's start-up
summary prints per rank. A config made for a GPU can be planned on a laptop.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from rich.console import Console
from rich.table import Table

from finsight.class_paths import configured_class
from finsight.data.batching import largest_micro_batch
from finsight.data.datamodule import FinSightDataModule
from finsight.errors import FinSightError
from finsight.model.loading import torch_dtype
from finsight.model.memory import recomputed_layer_count
from finsight.model.precision import PRECISION_COMPUTE_DTYPES, choose_precision
from finsight.references import split_checksum
from finsight.training.hardware import GPU_ACCELERATORS, requested_device_count
from finsight.training.memory_plan import RankMemory, gib, linear_elements, planned_rank_memory
from finsight.training.module import FinSightModule

# A card's memory that training can use: the CUDA context and the caching allocator's slack take the rest.
USABLE_GPU_SHARE = 0.9


class ModelConfigError(FinSightError, ValueError):
    """The model's ``config.json`` could not be read for the plan (offline, a gated model without a token, a
    file that is not a model config).

    Fix: pass `--model_config` with the model's `config.json`; for a gated Hub model (Llama-2) accept its
    licence and set `HF_TOKEN`.
    """


@dataclass(frozen=True)
class MemoryPlan:
    """A config's plan: the setting it was worked out for, and what one rank holds where."""

    model: str
    parameters: int
    device: str
    ranks: int
    strategy: str
    micro_batch: tuple[int, int]
    lora_rank: int
    compute_dtype: str
    recomputed_layers: int
    layers: int
    memory: RankMemory

    @property
    def device_bytes(self) -> int:
        """What one rank holds on its GPU (0 when the run computes on the CPU)."""
        return self.memory.total_on("gpu")

    @property
    def host_bytes(self) -> int:
        """What one rank holds in host RAM: everything, on a CPU run."""
        return self.memory.total_on("cpu")

    def setting(self) -> str:
        """One line naming what the numbers hold for."""
        recompute = (f"{self.recomputed_layers} of {self.layers} layers recompute" if self.recomputed_layers
                     else "no recomputation")
        return (f"{self.ranks} × {self.device.upper()}, {self.strategy}, micro-batch {self.micro_batch[0]} × "
                f"{self.micro_batch[1]} tokens, LoRA r={self.lora_rank}, {self.compute_dtype}, {recompute}")


def config_only(cli_class: type[LightningCLI]) -> type[LightningCLI]:
    """``cli_class`` (the ``fit`` CLI, with its linked arguments and sections) stopped before anything is
    instantiated, and before the hardware check: a config is planned on whatever machine the user has."""

    class ConfigOnlyCLI(cli_class):  # type: ignore[misc, valid-type]
        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument(
                "--model_config", type=str | None, default=None,
                help="The model's config.json (or a folder holding one): plan without reading "
                     "model.model_name, e.g. offline or for a gated model.")
            parser.add_argument(
                "--gpu_memory_gib", type=float | None, default=None,
                help="Say whether the plan fits a GPU of this many GiB (90%% of it usable).")

        def before_instantiate_classes(self) -> None:
            """Nothing is checked against this machine: the plan is for the machine the config names."""

        def instantiate_classes(self) -> None:
            """Nothing is built: the plan needs the parsed config only."""

    return ConfigOnlyCLI


def read_model_config(reference: str, model_config: str | None) -> Any:
    """The transformers config of the base: from ``--model_config``, else from the model reference without
    loading any weight (a GGUF file's metadata, a folder's config.json, the Hub's config.json)."""
    from transformers import AutoConfig

    from finsight.references import gguf_file

    if model_config is not None and not Path(model_config).exists():
        raise ModelConfigError(f"--model_config {model_config}: no such file or folder (expected a model's "
                               "config.json)")
    try:
        if model_config is not None:  # a folder holding config.json, or the JSON file itself
            return AutoConfig.from_pretrained(model_config, trust_remote_code=False)
        gguf = gguf_file(reference)
        if gguf is not None:
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        return AutoConfig.from_pretrained(reference, trust_remote_code=False)
    except (OSError, ValueError) as error:  # transformers' download, file and JSON errors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelConfigError(
            f"cannot read the config of model {reference!r} ({first_line}): pass --model_config with its "
            "config.json; a gated Hub model (Llama-2) needs HF_TOKEN set and its licence accepted") from None


def strategy_settings(strategy: Any) -> tuple[str, int, bool, bool, bool]:
    """(a name, ZeRO stage or 0, DeepSpeed or not, parameter offload, optimizer offload) of ``trainer.strategy``
    in every form Lightning takes: ``auto``, ``ddp``, ``deepspeed_stage_3_offload``, a ``class_path``.

    A registered name's settings are Lightning's own (``StrategyRegistry``); a class's unset options take the
    defaults of its signature (finsight's strategy offloads the optimizer by default, Lightning's does not).
    """
    named = isinstance(strategy, str) and strategy in StrategyRegistry
    cls = StrategyRegistry[strategy]["strategy"] if named else configured_class(strategy)
    if cls is None or not issubclass(cls, DeepSpeedStrategy):
        if cls is not None and issubclass(cls, DDPStrategy):
            return "DDP", 0, False, False, False
        if cls is None:
            return "one process per device", 0, False, False, False
        return cls.__name__, 0, False, False, False
    given = StrategyRegistry[strategy]["init_params"] if named else strategy.get("init_args") or {}
    settings = {**{name: p.default for name, p in inspect.signature(cls).parameters.items()}, **given}
    stage = int(settings["stage"])
    offload_optimizer = bool(settings["offload_optimizer"])
    # finsight's strategy calls it offload_param, Lightning's offload_parameters; DeepSpeed honours it in stage 3.
    offload_param = bool(settings.get("offload_param", settings.get("offload_parameters"))) and stage == 3
    if named:
        return f"DeepSpeed ZeRO-{stage}", stage, True, offload_param, offload_optimizer
    where = (" + parameter offload" if offload_param else "") + (" + optimizer offload" if offload_optimizer else "")
    return f"DeepSpeed ZeRO-{stage}{where}", stage, True, offload_param, offload_optimizer


def plan_from_config(config: Any, model_config: Any | None = None) -> MemoryPlan:
    """The plan of a parsed ``fit`` config (``model``, ``data``, ``trainer`` sections)."""
    trainer, model, data = config.trainer, config.model, config.data
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator == "auto":
        import torch

        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = "gpu" if accelerator in GPU_ACCELERATORS else "cpu"
    devices = requested_device_count(trainer.get("devices", "auto")) or 1
    ranks = devices * int(trainer.get("num_nodes") or 1)
    name, stage, deepspeed, offload_param, offload_optimizer = strategy_settings(trainer.get("strategy"))
    if name == "one process per device":
        name = "DDP" if ranks > 1 else "one process"
    precision = trainer.get("precision")
    # An unset precision follows the hardware: bf16 on the GPUs finsight is planned for; on a CPU, this CPU's
    # choice (bf16 with AVX512-BF16 or AMX, else float32), as the run would make it.
    dtype = str(model.get("compute_dtype") or "auto")
    if dtype == "auto":
        fallback = "bfloat16" if device == "gpu" else choose_precision("cpu").compute_dtype
        dtype = PRECISION_COMPUTE_DTYPES.get(str(precision), fallback)
    element_bytes = torch_dtype(dtype).itemsize
    batch_tokens = data.get("batch_tokens")
    micro_batch = largest_micro_batch(int(data.get("batch_size") or 1), int(data.get("max_length") or 1024),
                                      None if batch_tokens is None else int(batch_tokens))
    # The loader's own choice, for the device the config names (auto recomputes on a GPU).
    budget = model.get("activation_budget_gib")
    recomputed, _ = recomputed_layer_count(model.get("gradient_checkpointing", True),
                                           None if budget is None else float(budget), model_config, micro_batch,
                                           element_bytes, cuda=device == "gpu")
    lora_rank = int(model.get("lora_r") or 64)
    memory = planned_rank_memory(
        model_config, ranks=ranks, stage=stage, offload_param=offload_param, offload_optimizer=offload_optimizer,
        lora_rank=lora_rank, micro_batch=micro_batch, compute_bytes=element_bytes,
        double_quant=bool(model.get("double_quant", True)), quantized=model.get("quantization", "nf4") != "none",
        recomputed_layers=recomputed, deepspeed=deepspeed, device=device)
    parameters = sum(linear_elements(model_config))
    return MemoryPlan(model=str(model.model_name), parameters=parameters, device=device, ranks=ranks,
                      strategy=name, micro_batch=micro_batch, lora_rank=lora_rank, compute_dtype=dtype,
                      recomputed_layers=recomputed, layers=model_config.num_hidden_layers, memory=memory)


def plan_table(plan: MemoryPlan, gpu_memory_gib: float | None = None) -> Table:
    """The plan as the terminal shows it: each part, where it lives, its size; the totals; whether it fits."""
    table = Table()
    table.add_column("part")
    table.add_column("where")
    table.add_column("size", justify="right")
    for part, size, where in plan.memory.parts():
        if size:
            table.add_row(part, where, gib(size))
    if plan.device == "gpu":
        table.add_row("[bold]on each GPU[/]", "gpu", f"[bold]{gib(plan.device_bytes)}[/]")
    table.add_row("[bold]in host RAM per rank[/]", "cpu", f"[bold]{gib(plan.host_bytes)}[/]")
    if gpu_memory_gib is not None and plan.device == "gpu":
        fits = plan.device_bytes <= USABLE_GPU_SHARE * gpu_memory_gib * 2**30
        table.add_row(f"fits a {gpu_memory_gib:g} GiB GPU", "", "[green]yes[/]" if fits else "[red]no[/]")
    return table


NOT_COUNTED = ("Not counted: the CUDA context and allocator slack (keep ~10% of a card free), the data and the "
               "Python process (~1-2 GiB of host RAM), and the host RAM used while the base loads at start-up.")


def plan_main(args: list[str], cli_class: type[LightningCLI]) -> MemoryPlan:
    """``finsight plan``: parse the config as ``cli_class`` (``fit``'s CLI) would, print the plan, return it."""
    command_line = sys.argv
    # LightningCLI warns when sys.argv holds arguments besides ``args``: it sees only the program's name.
    sys.argv = command_line[:1]
    try:
        cli = config_only(cli_class)(FinSightModule, FinSightDataModule, args=args, run=False, seed_everything_default=False,
                            parser_kwargs={"default_env": False, "prog": "finsight plan"})
    finally:
        sys.argv = command_line
    config = cli.config
    model_config = read_model_config(str(config.model.model_name), config.get("model_config"))
    plan = plan_from_config(config, model_config)
    console = Console(file=sys.stdout)
    size = f"{plan.parameters / 1e9:.2f} B" if plan.parameters >= 1e9 else f"{plan.parameters / 1e6:.1f} M"
    # Soft-wrapped: a terminal wraps the long lines, and a pipe or a log keeps each one whole.
    console.print(f"[bold]Memory plan per rank[/] for {split_checksum(plan.model)[0]} ({size} parameters)",
                  soft_wrap=True)
    console.print(plan.setting(), soft_wrap=True)
    console.print(plan_table(plan, config.get("gpu_memory_gib")))
    available = psutil.virtual_memory().total
    if plan.device == "cpu" and plan.host_bytes > available:
        console.print(f"[red]This machine has {gib(available)} of RAM: the plan does not fit here.[/]", soft_wrap=True)
    console.print(NOT_COUNTED, soft_wrap=True)
    return plan
