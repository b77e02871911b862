"""Training: MNIST data and shards, the CNN, federated averaging, and the Ray Train entrypoint."""
