"""minillm: train small GPT-style language models from scratch, stage by stage, on one backbone."""

__version__ = "0.1.0"
