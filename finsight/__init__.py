"""finsight: fine-tune instruction-following LLMs into a finance assistant with QLoRA, as Lightning modules."""

__all__ = ["FinSightDataModule", "FinSightModule", "SourceConfig"]


def __getattr__(name: str):
    # Loaded when first asked for: importing the package alone (as the ``finsight`` command does before it
    # can report a bad installation in one line) loads none of the heavy libraries, and ``FinSightModule``
    # pulls in transformers' model classes.
    if name == "FinSightDataModule":
        from finsight.data.datamodule import FinSightDataModule

        return FinSightDataModule
    if name == "SourceConfig":
        from finsight.data.sources import SourceConfig

        return SourceConfig
    if name == "FinSightModule":
        from finsight.training.module import FinSightModule

        return FinSightModule
    raise AttributeError(name)
