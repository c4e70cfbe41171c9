"""The cloud side of split fine-tuning: sessions holding net2, and the gRPC daemon serving them."""
