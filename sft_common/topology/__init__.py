"""Where the model is cut: the split spec and fingerprint, the two-part split, the U-shape."""
