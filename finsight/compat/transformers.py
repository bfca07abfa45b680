"""transformers' config internals, quantizer rules and helpers finsight reads (checked on 5.17 and 5.24).

Generation rebuilds a dense model from a quantized one: that needs the attention kernel the loaded model
resolved, the quantization settings a config carries, the quantizer's rule for which layers it replaced and
the tied weights, none of them public. The chat encoder renders templates with transformers' own compiled
jinja, and the length-grouped order is the one transformers' sampler draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

DISTRIBUTION = "transformers"
TESTED = ">=5.17,<6"


def compiled_chat_template(template: str) -> Any:
    """The jinja template transformers itself renders chat templates with (compiled and cached once)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def attention_implementation(config: PretrainedConfig) -> str:
    """The attention kernel a loaded model really uses (``sdpa``, ``eager``, ...), resolved at load time."""
    return config._attn_implementation


def drop_quantization_settings(config: PretrainedConfig) -> None:
    """Remove the quantization settings from a model config, so a dequantized copy saves as a plain model."""
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)


def bnb_quantized_layer_names(model: PreTrainedModel, config: Any) -> list[str]:
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


def tied_weight_names(model: PreTrainedModel) -> set[str]:
    """Parameter names that share storage with another one (e.g. output and input embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, list | tuple | set) else tied.keys())


def enable_activation_checkpointing(model: PreTrainedModel, layers: int | None = None) -> None:
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


@contextmanager
def no_weight_init() -> Iterator[None]:
    """Build a model without random initialisation, for weights that are all replaced right after.

    transformers' ``no_init_weights`` lives in its internal ``initialization`` module (5.x).
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def length_grouped_indices(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """The order transformers' ``LengthGroupedSampler`` draws: shuffled megabatches sorted by length inside.

    Taken from ``transformers.trainer_pt_utils``, where the sampler keeps it, so that finsight's batches match
    what ``group_by_length`` users of the Trainer and TRL get.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return list(get_length_grouped_indices(lengths, batch_size, generator=generator))


KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = ()
LOG_FILTERS: tuple = ()
