"""One LightningModule per stage over the shared MiniGPT backbone. The stage table is `minillm.config.STAGES`
(name -> schema); each module declares its schema, and `stage_module(name)` finds the module of that schema."""

from minillm.config import STAGES
from minillm.stages.base import LMModule
from minillm.stages.dpo import DPOModule
from minillm.stages.pretrain import PretrainModule
from minillm.stages.reward import RewardModule
from minillm.stages.rlhf import RLHFModule
from minillm.stages.sft import SFTModule

MODULES: tuple[type[LMModule], ...] = (PretrainModule, SFTModule, DPOModule, RewardModule, RLHFModule)


def stage_module(name: str) -> type[LMModule]:
    """The module of stage `name`: the one whose `schema` the stage table gives it."""
    schema = STAGES.get(name)
    found = [m for m in MODULES if schema is not None and m.schema is schema]
    if len(found) != 1:
        raise ValueError(f"stage={name} has no module; known stages: {list(STAGES)}")
    return found[0]


__all__ = [
    "MODULES",
    "stage_module",
    "DPOModule",
    "LMModule",
    "PretrainModule",
    "RLHFModule",
    "RewardModule",
    "SFTModule",
]
