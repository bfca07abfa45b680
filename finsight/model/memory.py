"""Memory choices for training: which layers recompute their activations, and whether freed memory goes back
to the OS.

Both trade step speed for peak memory; ``auto`` decides from the model's shape, the micro-batch and the RAM
the machine has at start-up.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Literal

import psutil
import torch

from finsight.model.precision import ComputeDtype

GradientCheckpointing = bool | Literal["auto"]

# "auto" keeps activations (no recomputation) on the CPU while one micro-batch's activations take at most
# this share of the RAM available at start-up: the rest covers the model, the optimizer state, the data and
# whatever else the machine is running, and the estimate below is a count of saved tensors, not a measurement.
AUTO_CHECKPOINTING_RAM_SHARE = 0.25


def activation_bytes(config, batch_size: int, length: int, element_bytes: int, lora: bool = True) -> int:
    """Estimated memory that backward keeps for one micro-batch without gradient checkpointing.

    Per token and decoder layer of a Llama-style model: the inputs and outputs of the two RMSNorms, the
    attention's rotated query and key, value and output (~7 hidden-sized tensors), and the MLP's gate, up,
    activation and product (4 intermediate-sized). With LoRA, each adapter's dropout keeps a one-byte mask
    of its input (``finsight.model.lora_dropout``: 7 inputs, ~4.5 hidden and ~1.25 intermediate bytes); the
    rank-sized outputs of ``A`` are left out (a few percent). The attention kernel (SDPA) keeps no
    length x length matrix. Logits are left out: the training step runs the LM head on the trained
    positions only. Calibrated on SmolLM2-135M against what backward really saves (counted with
    ``torch.autograd.graph.saved_tensors_hooks``; ``benchmarks/RESULTS.md``, round 4).
    """
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = (7 * hidden + 4 * intermediate) * element_bytes
    if lora:
        per_token += 4.5 * hidden + 1.25 * intermediate
    return int(per_token * config.num_hidden_layers * batch_size * length)


def step_activation_bytes(config, batch_size: int, length: int, element_bytes: int, recomputed_layers: int = 0) -> int:
    """What one micro-batch's training step holds for backward: the figure the memory plan and the start-up
    summary give (:mod:`finsight.training.memory_plan`).

    Layers that are not recomputed keep :func:`activation_bytes`' share; a recomputed layer keeps only its
    input (one hidden-sized tensor per token), and while it recomputes in backward, one layer's full share is
    alive again. The logits are counted as if every position were trained (an upper bound: the training step
    runs the LM head on trained positions only), in float32 with their gradient, for the cross-entropy.
    """
    layers = config.num_hidden_layers
    recomputed_layers = min(max(recomputed_layers, 0), layers)
    per_layer = activation_bytes(config, batch_size, length, element_bytes) / layers
    kept = per_layer * (layers - recomputed_layers)
    inputs = recomputed_layers * batch_size * length * config.hidden_size * element_bytes
    recomputing = per_layer if recomputed_layers else 0
    logits = 2 * batch_size * length * config.vocab_size * 4
    return int(kept + inputs + recomputing + logits)


def choose_gradient_checkpointing(requested: GradientCheckpointing, config, micro_batch: tuple[int, int] | None,
                                  element_bytes: int, cuda: bool | None = None) -> tuple[bool, str]:
    """Decide whether to recompute activations in backward, and say why (for the start-up summary).

    Recomputation runs every layer's forward twice: about a third more compute per step, in exchange for
    keeping only each layer's input. On a GPU the memory is what limits batch and length, so ``auto``
    turns it on. On the CPU RAM is usually plentiful and compute is the bottleneck, so ``auto`` turns it
    off when the estimated activations of one micro-batch fit comfortably in the available RAM. ``cuda``
    names the device the run will train on (``finsight plan``); None: whether this machine has CUDA.
    """
    if requested != "auto":
        return bool(requested), "set in the config"
    if torch.cuda.is_available() if cuda is None else cuda:
        return True, "auto: CUDA, where memory rather than compute limits the micro-batch and length"
    if micro_batch is None:
        return True, "auto: the micro-batch size is unknown (no data module), so memory is kept low"
    batch_size, length = micro_batch
    need = activation_bytes(config, batch_size, length, element_bytes)
    available = psutil.virtual_memory().available
    sizes = (f"~{need / 2**30:.1f} GiB estimated for a {batch_size} x {length} micro-batch, "
             f"{available / 2**30:.1f} GiB RAM available")
    if need <= AUTO_CHECKPOINTING_RAM_SHARE * available:
        return False, f"auto: CPU and the activations fit ({sizes}); recomputing them would cost ~1/3 of each step"
    return True, (f"auto: CPU but the activations would take more than "
                  f"{AUTO_CHECKPOINTING_RAM_SHARE:.0%} of the free RAM ({sizes})")


def layers_to_recompute(config, micro_batch: tuple[int, int] | None, element_bytes: int,
                        budget_gib: float) -> tuple[int, str]:
    """How many decoder layers (the first ones) recompute so the others' activations fit ``budget_gib``, and why.

    Each layer kept saves recomputing its forward, about a third of its step cost, for its share of the
    activation estimate: a dial between recomputing every layer (least memory) and none (fastest).
    """
    layers = config.num_hidden_layers
    if micro_batch is None:
        return layers, "the micro-batch size is unknown (no data module), so every layer recomputes"
    need = activation_bytes(config, *micro_batch, element_bytes)
    kept = min(layers, int(budget_gib * 2**30 // (need / layers)))
    return layers - kept, (f"{layers - kept} of {layers} layers recompute: ~{need / 2**30:.2f} GiB estimated for a "
                           f"{micro_batch[0]} x {micro_batch[1]} micro-batch, activation budget {budget_gib:g} GiB")


def recomputed_layer_count(requested: GradientCheckpointing, budget_gib: float | None, config,
                           micro_batch: tuple[int, int] | None, element_bytes: int,
                           cuda: bool | None = None) -> tuple[int, str]:
    """How many decoder layers recompute in backward (0: checkpointing off), and why: the loader's choice and
    the memory plan's, from :func:`choose_gradient_checkpointing` and, with a budget, :func:`layers_to_recompute`."""
    checkpointing, reason = choose_gradient_checkpointing(requested, config, micro_batch, element_bytes, cuda)
    if not checkpointing:
        return 0, reason
    if budget_gib is None:
        return config.num_hidden_layers, reason
    recomputed, budget_reason = layers_to_recompute(config, micro_batch, element_bytes, budget_gib)
    return recomputed, f"{reason}; {budget_reason}"


ReleaseFreedMemory = bool | Literal["auto"]


def choose_memory_release(requested: ReleaseFreedMemory, checkpointing: bool, every_layer: bool = True,
                          compute_dtype: ComputeDtype = "float32") -> tuple[bool, str]:
    """Whether freed activations go back to the OS (lower peak RSS, slower CPU steps), and why.

    ``auto`` follows gradient checkpointing: recomputing every layer is the setting for memory-bound runs;
    without it, or with an activation budget that keeps some layers, speed was chosen, and glibc's reuse of
    freed blocks keeps steps fast. With half-precision activations (bf16 on CPUs with native bf16) the
    page faults were measured to cost far more time than the heap they save (``benchmarks/RESULTS.md``,
    round 5), so ``auto`` leaves glibc's reuse on there too.
    """
    if requested != "auto":
        return bool(requested), "set in the config"
    if checkpointing and every_layer and compute_dtype == "float32":
        return True, "auto: gradient checkpointing is on, memory is the constraint"
    if checkpointing and every_layer:
        return False, (f"auto: {compute_dtype} activations, where returning freed memory costs more time than "
                       "it saves memory")
    if checkpointing:
        return False, "auto: an activation budget keeps some layers, speed is the constraint"
    return False, "auto: gradient checkpointing is off, speed is the constraint"


# Blocks of at least this size get their own memory mapping from glibc, given back to the OS when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc's malloc give large freed blocks back to the OS instead of keeping them in its heap.

    PyTorch's CPU tensors come from malloc. glibc raises its mmap threshold each time a large block is
    freed (up to 32 MiB), after which every activation of a training step (a few MiB each) is carved out
    of the heap, and a heap pinned by the tensors that stay alive (checkpointed layer inputs, optimizer
    state) cannot shrink: freed blocks stay resident after the first forward, which was the difference
    between finsight's peak RSS and TRL's (``benchmarks/RESULTS.md``, round 2). A fixed threshold (which
    also stops the raising) keeps every block of ``threshold_bytes`` or more in its own mapping.

    The price is speed: each such block is mapped afresh and page-faulted in at every allocation instead
    of reusing heap memory (``benchmarks/RESULTS.md``, "The glibc mmap threshold: memory for speed").
    So the model loader sets it by default only when gradient checkpointing is on, the setting
    chosen where memory is the constraint (the model option ``release_freed_memory``). Process-wide and
    idempotent; Linux with glibc only, elsewhere nothing changes (returns False).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    return bool(mallopt(m_mmap_threshold, threshold_bytes))
