"""The edge side of split fine-tuning: data, net1, and the trainer that talks to the cloud."""
