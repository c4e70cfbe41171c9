"""State on disk: atomic files and training checkpoints."""
