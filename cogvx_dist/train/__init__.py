"""Train tier: run config, loss and the training loop (run on every rank by a DeepSpeed launcher)."""
