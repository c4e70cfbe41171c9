"""Data on the edge: GLUE tasks, the device's own files, causal-LM rows, metrics."""
