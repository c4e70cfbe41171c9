"""Shared parts of split fine-tuning: the split model, the wire codec, the generated protocol."""

__version__ = "0.1.0"
