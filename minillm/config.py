"""Config schemas, registered in Hydra's ConfigStore; the YAML files under conf/ hold only values.

Each group's schema lives next to the code it configures (`ModelConfig` in model.py, `TokenizerConfig` in
tokenizer.py); this module assembles them into the top-level schema and composes configs from Python exactly as
the command line does, so a typo or a wrong type fails at compose time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from minillm.model import ModelConfig
from minillm.tokenizer import TokenizerConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 1337


ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m minillm.train <overrides>` would run with, composed from Python."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def model_preset(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of conf/model/<name>.yaml (plus `key=value` overrides), validated."""
    cfg = compose([f"model={name}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return OmegaConf.to_object(cfg.model)
