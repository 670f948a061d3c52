"""Prep tier: decode videos and prompts, encode them with T5 and the CogVideoX VAE, write WebDataset shards."""
