"""The base model: loading it quantized or dense, LoRA on top, and the precision it computes in."""
