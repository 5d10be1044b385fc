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

__all__ = ["STAGES", "DPOModule", "LMModule", "PretrainModule", "RLHFModule", "RewardModule", "SFTModule"]
