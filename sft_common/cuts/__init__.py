"""What replaces the module at a cut: the FFN-input bottleneck and activation-aware factors."""
