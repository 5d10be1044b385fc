"""One LightningModule per stage over the shared MiniGPT backbone; `STAGES` maps `stage.name` to it."""

from minillm.stages.base import LMModule
from minillm.stages.pretrain import PretrainModule

STAGES: dict[str, type[LMModule]] = {"pretrain": PretrainModule}

__all__ = ["STAGES", "LMModule", "PretrainModule"]
