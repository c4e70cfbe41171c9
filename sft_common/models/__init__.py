"""Base models: names to weights, meta-device loading, the packaged SmolLM2, LoRA, families."""
