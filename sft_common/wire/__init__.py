"""What crosses the link: tensors as bytes (the codec) and the protocol's one exception."""
