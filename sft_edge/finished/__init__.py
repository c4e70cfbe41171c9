"""Using a finished run: load_trained, predict, export, forget, generate."""
