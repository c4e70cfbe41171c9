"""One-off studies behind docs/accuracy.md: each runs as `python -m bench.studies.<name>`."""
