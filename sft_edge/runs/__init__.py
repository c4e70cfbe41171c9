"""A training run on the edge: its config, set-up, loop, progress, scalars and report."""
