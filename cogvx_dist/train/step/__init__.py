"""The math of one training step: the model with its adapter, the diffusion loss and its random draws, sequence
parallelism and the FLOPs a step costs. Imports nothing else of train/ but its settings (config, ds_config)."""
