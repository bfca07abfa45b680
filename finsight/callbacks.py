"""The one import path configs name.

Every class a YAML ``class_path`` points at (callbacks, the DeepSpeed strategy, the checkpoint plugin) is
importable from here, so code can move inside the package without breaking a user's config.
"""

from finsight.evaluation.held_out import HeldOutEvaluator
from finsight.evaluation.prediction import JsonlPredictionWriter
from finsight.evaluation.samples import GenerationSamples
from finsight.export.adapter import AdapterExport
from finsight.training.batch_size import FinSightBatchSizeFinder
from finsight.training.checkpoint import AtomicCheckpointIO, LatestCheckpoint
from finsight.training.deepspeed import FinSightDeepSpeedStrategy
from finsight.training.monitoring import TrainingMonitor
from finsight.training.reliability import ExactResume, NonFiniteGuard, SampleLog, StepSeededRNG

__all__ = [
    "AdapterExport",
    "AtomicCheckpointIO",
    "ExactResume",
    "FinSightBatchSizeFinder",
    "FinSightDeepSpeedStrategy",
    "GenerationSamples",
    "HeldOutEvaluator",
    "JsonlPredictionWriter",
    "LatestCheckpoint",
    "NonFiniteGuard",
    "SampleLog",
    "StepSeededRNG",
    "TrainingMonitor",
]
