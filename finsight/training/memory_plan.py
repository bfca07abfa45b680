"""What each rank holds: the memory plan a user checks before a long run, measured at start-up and worked out
from a model's config alone for a model too large to load here.

Under DDP and ZeRO-1/2 every rank holds the whole 4-bit base; under ZeRO-3 (:mod:`finsight.training.deepspeed`)
each rank holds its partition of every parameter (``param.ds_tensor``), on the CPU with ``offload_param``.
:func:`measured_rank_memory` counts what this process really stores; :func:`planned_rank_memory` does the same
arithmetic from a ``transformers`` config (Llama-2-70B on 2 x 24 GB GPUs, say) without building the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finsight.model.memory import step_activation_bytes

ADAM_STATE_BYTES = 8
"""AdamW's two fp32 moments per trained element."""
MASTER_COPY_BYTES = 4
"""DeepSpeed's fp32 master copy of each trained element, beside the moments."""
NF4_BLOCK = 64
"""Elements per 4-bit quantization block; each block has one scale (absmax)."""


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds, and where."""

    base_bytes: int
    """The frozen base: 4-bit packed weights, embeddings, norms (this rank's partition under ZeRO-3)."""
    base_device: str
    quant_state_bytes: int
    """4-bit scales (absmax, double-quantized or not): not parameters, so every rank keeps all of them."""
    adapter_bytes: int
    optimizer_bytes: int
    optimizer_device: str
    activation_bytes: int
    """One micro-batch's training step, with the recomputation the run uses (an estimate,
    :func:`finsight.model.memory.step_activation_bytes`)."""
    ranks: int
    partitioned: bool
    training_device: str = "cpu"
    """Where the step computes: activations and the 4-bit scales live there."""
    adapter_device: str | None = None
    """Where the adapter's weights live; None: with the base."""
    gradient_bytes: int = 0
    """The adapter's fp32 gradients (partitioned over the ranks from ZeRO-2 on), where the step computes."""
    gathered_bytes: int = 0
    """ZeRO-3: the whole weights of the layers gathered onto the device at a time (the one computing and the
    one prefetched); planned only."""

    def parts(self) -> list[tuple[str, int, str]]:
        """(what, bytes, where) of everything counted, in the order the plan prints them."""
        return [("base weights", self.base_bytes, self.base_device),
                ("4-bit scales", self.quant_state_bytes, self.training_device),
                ("LoRA adapter", self.adapter_bytes, self.adapter_device or self.base_device),
                ("adapter gradients", self.gradient_bytes, self.training_device),
                ("optimizer state", self.optimizer_bytes, self.optimizer_device),
                ("activations", self.activation_bytes, self.training_device),
                ("ZeRO-3 gathered layers", self.gathered_bytes, self.training_device)]

    def total_on(self, device: str) -> int:
        """Bytes this rank holds on one kind of device (``gpu``, ``cuda``, ``cpu``)."""
        return sum(size for _, size, where in self.parts() if where == device)

    def described(self) -> str:
        """One line for the start-up summary."""
        share = f" (1/{self.ranks} of every parameter: ZeRO-3)" if self.partitioned else " (a whole copy)"
        return (f"base {gib(self.base_bytes)} on {self.base_device}{share} + 4-bit scales "
                f"{gib(self.quant_state_bytes)}, adapter {gib(self.adapter_bytes)}, optimizer "
                f"{gib(self.optimizer_bytes)} on {self.optimizer_device}, activations ~{gib(self.activation_bytes)} "
                "per micro-batch step")


def gib(count: float) -> str:
    """Bytes in the unit that reads best."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def stored_bytes(param: torch.nn.Parameter) -> tuple[int, str]:
    """Bytes this rank stores for a parameter, and the device: its ZeRO-3 partition when it has one."""
    stored = getattr(param, "ds_tensor", None)
    tensor = stored if stored is not None else param
    return tensor.numel() * tensor.element_size(), tensor.device.type


def quant_state_bytes(module: torch.nn.Module) -> int:
    """The 4-bit layers' scales and code books, which live beside the weights as plain tensors."""
    total = 0
    seen: set[int] = set()
    for submodule in module.modules():
        state = getattr(getattr(submodule, "weight", None), "quant_state", None)
        # PEFT's LoRA layer exposes its base layer's weight as its own: count each state once.
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        for value in (state.absmax, state.code, getattr(getattr(state, "state2", None), "absmax", None),
                      getattr(getattr(state, "state2", None), "code", None)):
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def optimizer_placement(strategy: Any) -> tuple[bool, str, int]:
    """(whether DeepSpeed holds the optimizer state, where, over how many ranks it is partitioned)."""
    config = getattr(strategy, "config", None)
    if isinstance(config, dict) and "zero_optimization" in config:
        offload = config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
        return True, "cpu" if offload else strategy.root_device.type, strategy.world_size
    return False, strategy.root_device.type, 1


def measured_rank_memory(module: torch.nn.Module, strategy: Any, config: Any,
                         micro_batch: tuple[int, int] | None, element_bytes: int,
                         recomputed_layers: int = 0) -> RankMemory:
    """What this rank holds now (after the strategy has set the model up), counted parameter by parameter;
    the activations are :func:`~finsight.model.memory.step_activation_bytes`' estimate, as in the plan."""
    base = adapter = trained_elements = 0
    devices: set[str] = set()
    adapter_devices: set[str] = set()
    partitioned = False
    for param in module.parameters():
        size, device = stored_bytes(param)
        partitioned |= hasattr(param, "ds_tensor")
        if param.requires_grad:
            adapter += size
            adapter_devices.add(device)
            trained_elements += getattr(param, "ds_numel", param.numel())
        else:
            base += size
            devices.add(device)
    deepspeed, optimizer_device, ranks = optimizer_placement(strategy)
    stage = int(strategy.config["zero_optimization"].get("stage", 0)) if deepspeed else 0
    per_element = ADAM_STATE_BYTES + (MASTER_COPY_BYTES if deepspeed else 0)
    activations = (step_activation_bytes(config, *micro_batch, element_bytes, recomputed_layers)
                   if micro_batch else 0)
    return RankMemory(base_bytes=base, base_device="+".join(sorted(devices)) or "-",
                      quant_state_bytes=quant_state_bytes(module), adapter_bytes=adapter,
                      optimizer_bytes=per_element * trained_elements // ranks, optimizer_device=optimizer_device,
                      activation_bytes=activations, ranks=strategy.world_size, partitioned=partitioned,
                      training_device=strategy.root_device.type,
                      adapter_device="+".join(sorted(adapter_devices)) or None,
                      gradient_bytes=4 * trained_elements // (ranks if stage >= 2 else 1))


def projection_shapes(config: Any) -> list[tuple[int, int]]:
    """(in, out) of the seven projections of one decoder layer of a Llama-style model: the layers that are
    quantized to 4 bits and that LoRA adapts."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, intermediate), (hidden, intermediate),
            (intermediate, hidden)]


def linear_elements(config: Any) -> tuple[int, int]:
    """(elements of the decoder's linear layers, which are quantized; elements of everything else) of a
    Llama-style model, from its config alone."""
    linear = sum(n_in * n_out for n_in, n_out in projection_shapes(config)) * config.num_hidden_layers
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    return linear, embeddings + norms


def lora_elements(config: Any, rank: int) -> int:
    """LoRA A and B on the seven projections of every decoder layer."""
    return sum(rank * (n_in + n_out) for n_in, n_out in projection_shapes(config)) * config.num_hidden_layers


def planned_rank_memory(config: Any, *, ranks: int, stage: int, offload_param: bool, offload_optimizer: bool,
                        lora_rank: int, micro_batch: tuple[int, int], compute_bytes: int = 2,
                        double_quant: bool = True, quantized: bool = True, recomputed_layers: int = 0,
                        deepspeed: bool = True, device: str = "gpu") -> RankMemory:
    """What one rank would hold for a model known only by its config: the 4-bit arithmetic of
    :func:`measured_rank_memory`, for a model too large to build here (``finsight plan``).

    4-bit weights take half a byte per element; their scales one fp32 (or, double-quantized, one byte plus a
    second-level fp32 per 256 blocks) per block of 64, kept whole on every rank. Without quantization the
    linear layers stay in the compute dtype. Embeddings and norms stay in the compute dtype; LoRA weights are
    fp32. AdamW keeps two fp32 moments per trained element, and DeepSpeed an fp32 master copy beside them,
    partitioned over the ranks from ZeRO-1 on. ``stage`` 0 means no ZeRO (one process, DDP).
    """
    linear, other = linear_elements(config)
    base = (linear // 2 if quantized else linear * compute_bytes) + other * compute_bytes
    scales = linear // NF4_BLOCK * (1 + 4 / 256 if double_quant else 4) if quantized else 0
    trained = lora_elements(config, lora_rank)
    partitioned = stage == 3
    share = ranks if partitioned else 1
    host_params = partitioned and offload_param
    per_element = ADAM_STATE_BYTES + (MASTER_COPY_BYTES if deepspeed else 0)
    # ZeRO-3 gathers one layer's weights while it computes and prefetches the next: two layers in flight.
    gathered = 2 * base // config.num_hidden_layers if partitioned else 0
    return RankMemory(base_bytes=base // share, base_device="cpu" if host_params else device,
                      quant_state_bytes=int(scales), adapter_bytes=4 * trained // share,
                      optimizer_bytes=per_element * trained // (ranks if deepspeed and stage >= 1 else 1),
                      optimizer_device="cpu" if offload_optimizer else device,
                      activation_bytes=step_activation_bytes(config, *micro_batch, compute_bytes, recomputed_layers),
                      ranks=ranks, partitioned=partitioned, training_device=device, gathered_bytes=gathered,
                      gradient_bytes=4 * trained // (ranks if deepspeed and stage >= 2 else 1))
