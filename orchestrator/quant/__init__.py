"""Layer 1: LSQ quantization core in plain torch (no Ray, no MLflow)."""
