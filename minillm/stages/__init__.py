"""One LightningModule per stage over the shared MiniGPT backbone; `STAGES` maps `stage.name` to it."""

from minillm.stages.base import LMModule
from minillm.stages.dpo import DPOModule
from minillm.stages.pretrain import PretrainModule
from minillm.stages.reward import RewardModule
from minillm.stages.rlhf import RLHFModule
from minillm.stages.sft import SFTModule

STAGES: dict[str, type[LMModule]] = {
    "pretrain": PretrainModule,
    "sft": SFTModule,
    "dpo": DPOModule,
    "reward": RewardModule,
    "rlhf": RLHFModule,
}


def stage_module(name: str) -> type[LMModule]:
    if name not in STAGES:
        raise ValueError(f"stage={name} has no module; known stages: {sorted(STAGES)}")
    return STAGES[name]


__all__ = [
    "STAGES",
    "stage_module",
    "DPOModule",
    "LMModule",
    "PretrainModule",
    "RLHFModule",
    "RewardModule",
    "SFTModule",
]
