"""The one way to get the model that generates, from the training model in memory or from the files on disk.

``finsight chat``, ``finsight test``, the training samples and ``finsight export`` all call
:func:`get_generation_model`, so every one of them answers with the same weights built the same way:

- a training model in memory (test, samples): the merged dense model built from it, or the model itself
  (``finsight.inference.merge.from_training_model`` chooses and logs why);
- :class:`~finsight.inference.weights.TrainedWeights` (an adapter folder, a checkpoint, a base model), on a
  CPU: the generation cache's entry for those weights when there is one, else the merged model built from
  the files (``merged_from_files``) and saved as that entry; with ``inference="4bit"`` or on a GPU, the
  model loaded as training holds it, then the same choice as for a training model.

PEFT and bitsandbytes are imported only when a model is built, never for a cache hit.
"""

from __future__ import annotations

import torch

from finsight.inference.cache import cache_entry, load_entry, store_entry
from finsight.inference.decoding import GenerationModel, InferenceChoice, InferenceDtype
from finsight.inference.weights import TrainedWeights


def get_generation_model(source: TrainedWeights | torch.nn.Module, *, inference: InferenceChoice = "auto",
                         dtype: InferenceDtype = "auto", merge_adapter: bool = True,
                         cache: bool = True) -> GenerationModel:
    """The model to generate with from ``source``, built (or found in the cache) and described in one log line.

    ``merge_adapter=False`` gives the base alone (``finsight test --compare_base``). ``cache`` reads and writes
    the generation cache for weights on disk (a training model in memory is never cached here: its adapter
    may not be written yet).
    """
    if isinstance(source, torch.nn.Module):
        from finsight.inference.merge import from_training_model

        return from_training_model(source, inference=inference, dtype=dtype, merge_adapter=merge_adapter)
    weights = source if merge_adapter else TrainedWeights.of_base(source.reference, source.settings)
    if inference == "4bit" or torch.cuda.is_available():
        from finsight.inference.merge import from_training_model, quantized_from_files

        return from_training_model(quantized_from_files(weights), inference=inference, dtype=dtype)
    target = weights.settings.compute_dtype if dtype == "auto" else dtype
    entry = cache_entry(weights, target) if cache else None
    if entry is not None:
        found = load_entry(entry, target, weights.settings.attn_implementation)
        if found is not None:
            return found
    from finsight.inference.merge import merged_from_files  # bitsandbytes and PEFT: only when building

    generator = merged_from_files(weights, dtype)
    if entry is not None:
        store_entry(generator, entry, weights, target, "chat")
    return generator
