"""torch's private CPU detection finsight reads (checked on torch 2.13)."""

from __future__ import annotations

DISTRIBUTION = "torch"
TESTED = ">=2.13,<2.14"


def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), and its instruction set's name.

    torch exposes the detection only privately (``torch.cpu._is_avx512_bf16_supported``); where it is missing
    the answer is "no", which keeps float32, the choice that is right everywhere.
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


KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = ()
LOG_FILTERS: tuple = ()
