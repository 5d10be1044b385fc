"""Config schemas, registered in Hydra's ConfigStore; the YAML files under conf/ hold only values.

Each group's schema lives next to the code it configures when that code has one (`ModelConfig` in model.py,
`TokenizerConfig` in tokenizer.py); the rest are here. `trainer`, `callbacks` and `logger` are Lightning
`_target_` YAML: their schema is Lightning's own signature, checked when `build()` instantiates them, before
any tensor exists. Everything else is typed here, so a typo or a wrong type fails at compose time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from minillm.model import ModelConfig
from minillm.tokenizer import TokenizerConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DATA_DIR_ENV = "MINIGPT_DATA_DIR"


@dataclass
class SourceConfig:
    """Per-source sampling, keyed by file stem under `data.sources` (e.g. `data.sources.kjv.sample_ratio=0.5`)."""

    sample_ratio: float = 1.0
    max_samples: Optional[int] = None
    val_ratio: Optional[float] = None  # None: data.val_ratio


@dataclass
class DataConfig:
    dir: Optional[str] = None  # None: $MINIGPT_DATA_DIR when set, else the built-in corpus (data/builtin)
    batch_size: int = 16
    val_ratio: float = 0.01  # held out by a hash of each record: adding data never reshuffles validation
    sample_ratio: float = 1.0  # global, multiplies each source's sample_ratio
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    skip_bad_records: bool = False  # skip and count malformed lines instead of failing
    packing: bool = False  # chat data: several conversations per window (block-diagonal attention)
    num_workers: int = 0
    num_proc: int = 1  # processes for tokenization
    cache_dir: str = "data/cache/datasets"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ValueError(f"data.val_ratio must be in [0, 1), got {self.val_ratio}")
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"data.sample_ratio must be in (0, 1], got {self.sample_ratio}")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1  # on matrices only; norms and embeddings are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps


@dataclass
class StageConfig:
    name: str = "pretrain"
    parent: Optional[str] = None  # the stage whose final/ weights init_from=auto starts from


@dataclass
class DPOConfig(StageConfig):
    """stage=dpo hyper-parameters (conf/stage/dpo.yaml); names and meanings as in TRL's DPOConfig."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    max_prompt_length: int = 128  # prompt tokens kept (the end of the prompt)
    max_completion_length: int = 128  # completion tokens kept (the start)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"stage.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class RewardConfig(StageConfig):
    """stage=reward hyper-parameters (conf/stage/reward.yaml); names as in TRL's RewardConfig."""

    center_rewards_coefficient: float = 0.0  # + c * mean((r_chosen + r_rejected)^2): rewards centred on 0
    max_prompt_length: int = 128
    max_completion_length: int = 128

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"stage.center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


@dataclass
class DebugConfig:
    max_new_tokens: int = 32
    show_tokens: int = 48  # how many token ids of the first row to print


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # lightning.pytorch.Trainer arguments
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> _target_ config (null disables one)
    logger: dict[str, Any] = field(default_factory=dict)
    seed: int = 1337
    run_dir: str = "outputs/${stage.name}_${model.name}"
    init_from: Optional[str] = "auto"  # auto: outputs/<stage.parent>_<model.name>/final; or a folder / .ckpt; null
    init_sha256: Optional[str] = None  # filled in by build(): sha256 of the init weights file
    resume: Optional[str] = None  # "auto" (latest loadable checkpoint of run_dir) or a .ckpt path
    resume_allow_changes: bool = False  # resume although hyper-parameters differ from the checkpoint's
    overwrite: bool = False  # start fresh in a run_dir that already holds checkpoints (they are deleted)
    prompt: str = "To be, or not to be"  # what debug (and later eval) generates from
    optimized_metric: str = "val/loss"  # what a multirun job returns to the sweeper


ConfigStore.instance().store(name="schema", node=Config)
# Stage-specific schemas: a stage YAML pulls its own in with `- /stage_schema/<name>@stage` in its defaults.
ConfigStore.instance().store(group="stage_schema", name="dpo", node=DPOConfig)
ConfigStore.instance().store(group="stage_schema", name="reward", node=RewardConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m minillm.train <overrides>` would run with, composed from Python."""
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its search path
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_config(cfg: DictConfig) -> Config:
    """Typed, validated dataclasses (runs every __post_init__). Group configs stay plain dicts."""
    return OmegaConf.to_object(cfg)


def resolved_dict(cfg: DictConfig) -> dict:
    """The whole config as plain containers, interpolations resolved (for snapshots and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)


def model_preset(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of conf/model/<name>.yaml (plus `key=value` overrides), validated."""
    cfg = compose([f"model={name}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return OmegaConf.to_object(cfg.model)
