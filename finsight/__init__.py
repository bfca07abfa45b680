"""finsight: fine-tune instruction-following LLMs into a finance assistant with QLoRA, as Lightning modules."""

from finsight.data.module import FinSightDataModule
from finsight.data.sources import SourceConfig

__all__ = ["FinSightDataModule", "FinSightModule", "SourceConfig"]


def __getattr__(name: str):
    # Deferred on purpose (not a cycle): the model module imports transformers, PEFT and bitsandbytes'
    # configuration, which ``FinSightDataModule`` users never need; load it only when asked for.
    if name == "FinSightModule":
        from finsight.module import FinSightModule

        return FinSightModule
    raise AttributeError(name)
