"""Training data: the shard schema (shared with the prep tier) and the train-side reader."""
