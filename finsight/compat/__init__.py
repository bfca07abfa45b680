"""What finsight relies on in Lightning, transformers, torchdata, bitsandbytes and torch beyond their public
API, in one place.

A few things finsight needs have no public API: a resumed run must validate after a restored batch as the
uninterrupted run did (Lightning's loop state), and generation rebuilds a dense model from a quantized one
(transformers' config internals). Each such use is a named function here that says what it reads and why;
no other module touches another library's private attributes. Private parts change without notice, so
importing this module checks the installed versions of these libraries against :data:`TESTED`, the ranges
``pyproject.toml`` allows and CI tests at both ends, and fails with one line outside them
(:class:`UnsupportedVersionError`) rather than resuming with wrong step counters later.

It also owns the filters for the known noise of these versions (:func:`quiet_known_noise`): deprecation
warnings that third-party code raises on every run and finsight cannot fix at their cause, each filtered
by its message and the module that raises it, never by category alone.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Callable
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from finsight.errors import FinSightError

TESTED: dict[str, str] = {
    "lightning": ">=2.6,<2.7",
    "transformers": ">=5.17,<6",
    "torchdata": ">=0.10,<0.12",
    "bitsandbytes": ">=0.50,<0.51",
}
"""Version ranges of the libraries whose internals finsight uses; ``pyproject.toml`` declares the same ones."""


class UnsupportedVersionError(FinSightError, ImportError):
    """An installed library is outside the version range finsight is tested with."""


def check_versions(installed: Callable[[str], str] = importlib.metadata.version) -> None:
    """Raise :class:`UnsupportedVersionError` naming the first library outside its tested range.

    Pre-releases of an allowed version count as that version (a ``2.6.0rc1`` is checked as ``2.6.0``).
    """
    for package, allowed in TESTED.items():
        found = installed(package)
        if Version(Version(found).base_version) not in SpecifierSet(allowed):
            raise UnsupportedVersionError(
                f"{package} {found} is installed, but finsight is tested with {package}{allowed} "
                f"(pip install '{package}{allowed}')")


check_versions()


# ------------------------------------------------------------------------------------------------ Lightning


def checkpoint_every_n_train_steps(callback: Any) -> int:
    """A ``ModelCheckpoint``'s ``every_n_train_steps`` (0 when off), for the start-up summary.

    Lightning keeps the constructor argument only as a private attribute.
    """
    return int(callback._every_n_train_steps or 0)


def validation_skipped_at_resume(trainer: Any) -> bool:
    """Whether a run resumed from an ``every_n_train_steps`` checkpoint skips a validation that was due.

    Such checkpoints are written in ``on_train_batch_end``, before that batch's validation; Lightning
    resumes past the batch and so past its validation, which the uninterrupted run did run.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop.restarting and epoch_loop.restarted_on_train_batch_end
                and not epoch_loop.val_loop.restarted_mid_evaluation
                and epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def run_skipped_validation_first(trainer: Any) -> None:
    """Make a resumed run validate before its next batch, with the uninterrupted run's counters.

    The validation loop is marked as restarted before it began, so Lightning runs it instead of skipping
    it; the restored batch is then counted as stepped twice (by the restart and by the validation's step
    end) unless gradients are still accumulating, so one count is taken back.
    """
    from lightning.pytorch.loops.evaluation_loop import RestartStage

    epoch_loop = trainer.fit_loop.epoch_loop
    val_loop = epoch_loop.val_loop
    val_loop._restart_stage = RestartStage.RESTARTED_MID_EVALUATION
    val_loop.batch_progress.current.reset()
    if not epoch_loop._should_accumulate():
        epoch_loop._batches_that_stepped -= 1


def init_deepspeed_distributed(strategy: Any) -> None:
    """Start DeepSpeed's process group as ``DeepSpeedStrategy.setup_distributed`` does, minus its CUDA check."""
    strategy._init_deepspeed_distributed()


# --------------------------------------------------------------------------------------------- bitsandbytes


def keep_4bit_weights_unpacked(model: Any) -> int:
    """Switch off bitsandbytes' CPU packing format on every 4-bit layer of ``model``; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 (read in 0.50.0 and 0.50.2) converts a ``Linear4bit``
    weight in place into an inference layout the first time the layer runs in eval mode with an input that
    needs no gradient (a validation step, a ``no_grad`` check), and converts it back only when the layer's
    state dict is taken. In that layout ``matmul_4bit`` calls ``gemv_4bit``, which has no autograd formula:
    every later backward silently skips the input gradient through the frozen base projections, so LoRA
    trains on wrong gradients; and the way back re-quantizes the constants from bfloat16, so each cycle
    changes the frozen base. The layer reads its ``support_avx512bf16_for_cpu`` flag (set at construction
    from the CPU detection) at every forward; turning it off keeps the layout finsight loaded, on every CPU.
    It can go once bitsandbytes packs only for models that never train (or gives ``gemv_4bit`` a backward
    and a lossless way back); the oracle test in ``tests/compat/test_cpu_kinds.py`` shows when.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# ------------------------------------------------------------------------------------------------ torch


def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), and its instruction set's name.

    torch exposes the detection only privately (``torch.cpu._is_avx512_bf16_supported``, checked on torch
    2.13); where it is missing the answer is "no", which keeps float32, the choice that is right everywhere.
    """
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    if amx:
        return True, "AMX"
    if avx512_bf16:
        return True, "AVX512-BF16"
    capability = torch.backends.cpu.get_cpu_capability()  # public: DEFAULT, AVX2, AVX512, ...
    return False, {"DEFAULT": "no AVX2"}.get(capability, capability)


# --------------------------------------------------------------------------------------------- transformers


def compiled_chat_template(template: str) -> Any:
    """The jinja template transformers itself renders chat templates with (compiled and cached once)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def attention_implementation(config: Any) -> str:
    """The attention kernel a loaded model really uses (``sdpa``, ``eager``, ...), resolved at load time."""
    return config._attn_implementation


def drop_quantization_settings(config: Any) -> None:
    """Remove the quantization settings from a model config, so a dequantized copy saves as a plain model."""
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)


def bnb_quantized_layer_names(model: Any, config: Any) -> list[str]:
    """The linear layers transformers replaces by bitsandbytes layers when it loads ``model`` with ``config``.

    The same rule as transformers' bitsandbytes quantizer: every ``nn.Linear`` except the modules it keeps
    unquantized (the output head and tied weights, ``llm_int8_skip_modules``, ``_keep_in_fp32_modules``).
    """
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, config.llm_int8_skip_modules,
                                                  getattr(model, "_keep_in_fp32_modules", None))
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, keep)]


def tied_weight_names(model: Any) -> set[str]:
    """Parameter names that share storage with another one (e.g. output and input embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, list | tuple | set) else tied.keys())


def enable_activation_checkpointing(model: Any, layers: int | None = None) -> None:
    """Recompute activations in backward, with the non-reentrant checkpoint (needed for frozen inputs).

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and
    deprecated the old name; the new one is used where it exists. ``layers``: only the first ``layers``
    decoder layers recompute; transformers enables all of them and reads each layer's
    ``gradient_checkpointing`` flag at every forward, so the others get the flag turned off.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if layers is not None:
        decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(decoder_layers):
            layer.gradient_checkpointing = index < layers


# ------------------------------------------------------------------------------------------------ noise

# (message regex, module regex, category) of warnings the tested versions raise on every run from code that
# is not finsight's: PEFT reads transformers' deprecated ``is_gradient_checkpointing`` while wrapping a model,
# torchdata's ``StatefulDataLoader`` calls torch's deprecated ``set_vital``, Lightning's pytree helper builds
# torch's deprecated ``LeafSpec``, bitsandbytes' import decorates with torch's deprecated
# ``torch.jit.script_method``.
KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script", DeprecationWarning),
    (r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils", FutureWarning),
    (r"'set_vital' is deprecated", r"torchdata\.stateful_dataloader", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree", FutureWarning),
)

# Lightning logs this advertisement at every Trainer start without the optional litlogger package.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LITLOGGER_TIP)


# DeepSpeed's notice (on standard output) each time a process imports it on a machine without CUDA; saving a
# transformers model imports it through accelerate, so every CPU fit and chat that saves one printed it.
NO_ACCELERATOR_NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator"


class _DropNoAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(NO_ACCELERATOR_NOTICE):
            return True
        import torch  # loaded already (DeepSpeed is logging); this module imports no heavy library itself

        return torch.cuda.is_available()  # CUDA there and DeepSpeed still chose the CPU: that is news, it stays


# bitsandbytes logs this when it is imported on a CPU with AVX512-BF16 and the optional ``kernels`` package
# (which fetches a kernel from the Hugging Face Hub) is absent. That kernel serves only the CPU packing
# format, which finsight switches off (keep_4bit_weights_unpacked): the line is about a path never taken.
NO_PACKED_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropNoPackedKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_PACKED_KERNEL_NOTICE)


LOG_FILTERS: tuple[tuple[str, type[logging.Filter]], ...] = (
    ("lightning.pytorch.utilities.rank_zero", _DropLitLoggerTip),
    ("DeepSpeed", _DropNoAcceleratorNotice),  # DeepSpeed configures this logger when imported; filters stay
    ("bitsandbytes.backends.cpu.ops", _DropNoPackedKernelNotice),
)


def _filter_known_log_lines() -> None:
    for name, noise in LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, noise) for f in logger.filters):
            logger.addFilter(noise())


# At import: bitsandbytes logs its notice while being imported, and finsight's modules import this one first.
_filter_known_log_lines()


def quiet_known_noise() -> None:
    """Filter the known third-party noise of the tested versions (idempotent); everything else still shows."""
    for message, module, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _filter_known_log_lines()

