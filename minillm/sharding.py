"""`trainer=fsdp`'s strategy: Lightning's FSDPStrategy with each transformer block its own FSDP unit (gathered
for its own forward and backward, then freed) and the embeddings, final norm and LM head in the root unit.
Without a wrap policy the whole model is one unit, gathered whole for every forward: no memory is saved.

Checkpoints stay full state dicts gathered on rank 0 (`state_dict_type="full"`), so resume, `final/` and every
tool that reads a checkpoint work unchanged; sharded checkpoints are not written yet."""

from __future__ import annotations


def fsdp_strategy(**kwargs):
    """FSDPStrategy(auto_wrap_policy={Block}, **kwargs); kwargs as Lightning's (sharding_strategy, cpu_offload,
    activation_checkpointing_policy, ...)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from minillm.model import Block

    return FSDPStrategy(auto_wrap_policy={Block}, **kwargs)
