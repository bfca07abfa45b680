"""The LightningModule and what a ``fit`` needs around it: checkpoints, DeepSpeed, reliability, monitoring."""
