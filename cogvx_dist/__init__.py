"""cogvx-dist: distributed LoRA fine-tuning for CogVideoX on DeepSpeed."""

__version__ = "0.1.0"
