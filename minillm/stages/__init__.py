"""One LightningModule per stage over the shared MiniGPT backbone; `STAGES` maps `stage.name` to it."""

from minillm.stages.base import LMModule
from minillm.stages.pretrain import PretrainModule
from minillm.stages.sft import SFTModule

STAGES: dict[str, type[LMModule]] = {"pretrain": PretrainModule, "sft": SFTModule}

__all__ = ["STAGES", "LMModule", "PretrainModule", "SFTModule"]
