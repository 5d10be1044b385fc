"""Config schemas, registered in Hydra's ConfigStore; the YAML files under conf/ hold only values.

The schemas the library shares with the commands (`ModelConfig`, `GenerationConfig`, `EvalConfig`) are in
schemas.py, `TokenizerConfig` in tokenizer.py (neither loads torch); the rest are here. `trainer`, `callbacks`
and `logger` are Lightning `_target_` YAML: their schema is Lightning's own signature, checked when `build()`
instantiates them, before any tensor exists. Everything else is typed here, so a typo or a wrong type fails at
compose time.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from minillm.schemas import ModelConfig
from minillm.tokenizer import TokenizerConfig


def _conf_dir() -> Path:
    """The config tree: the top-level `conf/` of a checkout, installed as the `minillm.conf` package (a wheel
    carries it; an editable install maps it to the checkout's folder)."""
    try:
        return Path(str(importlib.resources.files("minillm.conf")))
    except ModuleNotFoundError:  # a checkout on sys.path that was never installed
        return Path(__file__).resolve().parent.parent / "conf"


CONF_DIR = _conf_dir()
DATA_DIR_ENV = "MINILLM_DATA_DIR"
DATA_DIR_ENV_OLD = "MINIGPT_DATA_DIR"  # the earlier spelling, still read


def data_dir_from_env() -> tuple[str, str] | None:
    """(path, variable) of the data dir named in the environment, $MINILLM_DATA_DIR first."""
    for name in (DATA_DIR_ENV, DATA_DIR_ENV_OLD):
        if os.environ.get(name):
            return os.environ[name], name
    return None


@dataclass
class SourceConfig:
    """One source under `data.sources.<name>`: a file of the data dir (keyed by its stem) or, with `hf` set, a
    Hugging Face dataset (minillm/data/hf.py). On the command line `+data.sources.<name>.sample_ratio=0.5` adds a
    key the config does not have yet, `'+data.sources.stories={hf: roneneldan/TinyStories}'` a whole source."""

    sample_ratio: float = 1.0  # 0 leaves the source out
    max_samples: Optional[int] = None
    val_ratio: Optional[float] = None  # None: data.val_ratio
    # A Hugging Face dataset: a hub id, a builder (parquet, csv, json, arrow, text) with data_files, or a local
    # path (a save_to_disk folder, a data file, a folder of data files).
    hf: Optional[str] = None
    subset: Optional[str] = None  # the hub dataset's config name
    split: str = "train"
    revision: Optional[str] = None
    data_files: Any = None  # a path, a list of paths or {split: paths}, for a builder
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the dataset's column: {text: story}
    kind: Optional[str] = None  # pretrain | sft | preference | prompts; None: whatever the stage reads

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], got {self.sample_ratio}")
        hf_only = ("subset", "revision", "data_files", "kind")
        set_ = [k for k in hf_only if getattr(self, k) is not None] + (["columns"] if self.columns else [])
        if self.hf is None and set_:
            raise ValueError(f"{', '.join(set_)}: only a Hugging Face source (hf=...) takes these")
        if not isinstance(self.columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items()
        ):
            raise ValueError(
                f"columns must map our field names to column names ({{text: story}}), got {self.columns!r}"
            )
        files = self.data_files
        if not (files is None or isinstance(files, (str, list, dict))):
            raise ValueError(f"data_files must be a path, a list of paths or {{split: paths}}, got {files!r}")
        kinds = ("pretrain", "sft", "preference", "prompts")
        if self.kind is not None and self.kind not in kinds:
            raise ValueError(f"kind must be one of {', '.join(kinds)}, got {self.kind!r}")


@dataclass
class DataConfig:
    dir: Optional[str] = None  # None: $MINILLM_DATA_DIR (or $MINIGPT_DATA_DIR), else data/builtin
    batch_size: int = 16
    val_ratio: float = 0.01  # held out by a hash of each record: adding data never reshuffles validation
    sample_ratio: float = 1.0  # global, multiplies each source's sample_ratio
    # file stem -> SourceConfig fields. Typed by __post_init__: OmegaConf cannot add keys to a Dict[str, dataclass]
    # from the command line, so the schema keeps a plain dict.
    sources: dict[str, Any] = field(default_factory=dict)
    skip_bad_records: bool = False  # skip and count malformed lines instead of failing
    packing: bool = False  # chat data: several conversations per window (block-diagonal attention)
    streaming: bool = False  # pretraining: train from the sources as they are read (minillm/data/stream.py)
    num_workers: int = 0
    num_proc: int = 1  # processes for tokenization
    cache_dir: str = "data/cache/datasets"

    def __post_init__(self) -> None:
        known = {f.name for f in fields(SourceConfig)}
        for name, src in list(self.sources.items()):
            if isinstance(src, SourceConfig):
                continue
            if not isinstance(src, dict) or set(src) - known:
                raise ValueError(f"data.sources.{name}: expected a mapping with keys {sorted(known)}, got {src!r}")
            try:
                self.sources[name] = SourceConfig(**src)
            except ValueError as e:
                raise ValueError(f"data.sources.{name}.{e}") from None
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

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"optim.lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}"),
            (
                len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}",
            ),
            (self.eps > 0, f"optim.eps must be > 0, got {self.eps}"),
            (self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class StageConfig:
    """What every stage has. Each stage has its own schema below, pulled in by its conf/stage/<name>.yaml."""

    name: str = "pretrain"
    parent: Optional[str] = None  # the stage whose final/ init_from=auto starts from; "dpo|sft": the first found

    @property
    def lengths(self) -> tuple[int, int]:
        """(prompt, completion) tokens kept per record, for the stages whose data has prompts."""
        return (128, 128)


@dataclass
class PretrainConfig(StageConfig):
    """stage=pretrain (conf/stage/pretrain.yaml): everything it needs is in model, tokenizer, data and optim."""


@dataclass
class SFTConfig(StageConfig):
    """stage=sft (conf/stage/sft.yaml): packing and lengths are data settings (data.packing, block_size)."""


@dataclass
class PromptLengths(StageConfig):
    max_prompt_length: int = 128  # prompt tokens kept (the end of the prompt)
    max_completion_length: int = 128  # completion tokens kept (the start); RLHF: new tokens per completion

    @property
    def lengths(self) -> tuple[int, int]:
        return (self.max_prompt_length, self.max_completion_length)


@dataclass
class DPOConfig(PromptLengths):
    """stage=dpo hyper-parameters (conf/stage/dpo.yaml); names and meanings as in TRL's DPOConfig."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    rpo_alpha: float = 0.0  # + alpha * NLL of the chosen replies (RPO, Pang et al. 2024); 0: plain DPO

    def __post_init__(self) -> None:
        if self.rpo_alpha < 0:
            raise ValueError(f"stage.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.beta <= 0:
            raise ValueError(f"stage.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class RewardConfig(PromptLengths):
    """stage=reward hyper-parameters (conf/stage/reward.yaml); names as in TRL's RewardConfig."""

    center_rewards_coefficient: float = 0.0  # + c * mean((r_chosen + r_rejected)^2): rewards centred on 0
    # ours, not TRL's: None = the head alone; a number w = the reward adds w x the trunk's mean log-likelihood of
    # the completion, w learned from this start (minillm.model.RewardModel)
    likelihood_weight: Optional[float] = None

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"stage.center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        if self.likelihood_weight is not None and not math.isfinite(self.likelihood_weight):
            raise ValueError(f"stage.likelihood_weight must be a finite number or null, got {self.likelihood_weight}")


RLHF_ALGORITHMS = ("ppo", "grpo")


@dataclass
class RLHFConfig(PromptLengths):
    """stage=rlhf hyper-parameters (conf/stage/rlhf.yaml); names as in TRL's PPOConfig / GRPOConfig."""

    algorithm: str = "ppo"  # ppo | grpo
    reward: str = "model"  # model: a trained reward model; else a rule from minillm.reward_rules (verifiable, ...)
    reward_model: Optional[str] = None  # None: outputs/reward_<model>/final
    reward_model_sha256: Optional[str] = None  # filled in by build(): resume refuses another reward model
    temperature: float = 1.0  # rollout sampling
    # rollouts decode through the compiled fixed-shape step (torch.compile; a C++ compiler on CPU). Off: on a Zen 4
    # at 16 rows it measured no faster in fp32 and slower in bf16-mixed (docs/performance.md); measure on yours
    compile_rollouts: bool = False
    top_k: int = 0
    top_p: float = 1.0
    num_generations: int = 4  # GRPO: completions per prompt (the group); PPO: 1
    beta: float = 0.05  # KL coefficient (PPO's kl_coef, GRPO's beta)
    cliprange: float = 0.2  # ε of the clipped ratio
    cliprange_value: float = 0.2  # PPO value clipping
    vf_coef: float = 0.1  # PPO value-loss weight
    entropy_coef: float = 0.0  # entropy bonus (0 = off)
    gamma: float = 1.0  # PPO discount
    lam: float = 0.95  # PPO GAE λ
    num_ppo_epochs: int = 2  # passes over each rollout batch (GRPO's num_iterations)
    num_mini_batches: int = 1  # updates per pass
    missing_eos_penalty: Optional[float] = None  # subtracted from the score of a completion without EOS
    # reward hacking guard: a reply with fewer than min_completion_length tokens before its EOS (default: an empty
    # reply) has short_completion_penalty subtracted from its score (a learned reward model may prefer silence)
    min_completion_length: int = 1
    short_completion_penalty: Optional[float] = 1.0
    loss_type: str = "dapo"  # GRPO aggregation: grpo | dapo | dr_grpo
    scale_rewards: str = "group"  # GRPO advantage scaling: group | batch | none
    max_grad_norm: float = 1.0  # clip_gradients (the Trainer's gradient_clip_val is off under manual optimization)
    # PPO-ptx (Ouyang et al. 2022): every update also takes ptx_coef x the SFT loss of ptx_batch_size conversations
    # drawn from the pooled <data dir>/sft/<stem>.jsonl files of ptx_sources (records outside this run's
    # data.val_ratio split), so that optimizing the reward does not unlearn the supervised tasks. 0 = off.
    ptx_coef: float = 0.0
    ptx_sources: list[str] = field(default_factory=list)
    ptx_batch_size: int = 16

    def __post_init__(self) -> None:
        checks = [
            (self.algorithm in RLHF_ALGORITHMS, f"stage.algorithm must be one of {RLHF_ALGORITHMS}"),
            (self.ptx_coef >= 0 and self.ptx_coef == self.ptx_coef, "stage.ptx_coef must be a number >= 0"),
            (self.ptx_batch_size >= 1, "stage.ptx_batch_size must be >= 1"),
            (
                self.ptx_coef == 0 or bool(self.ptx_sources),
                "stage.ptx_coef > 0 needs stage.ptx_sources: the sft/ files to read (e.g. [verifiable])",
            ),
            (self.beta >= 0, "stage.beta must be >= 0"),
            (
                self.num_generations >= (2 if self.algorithm == "grpo" else 1),
                "stage.num_generations must be >= 2 for GRPO (advantages compare completions of one prompt)",
            ),
            (
                self.num_ppo_epochs >= 1 and self.num_mini_batches >= 1,
                "stage.num_ppo_epochs and stage.num_mini_batches must be >= 1",
            ),
            (self.max_completion_length >= 1, "stage.max_completion_length must be >= 1"),
            (self.temperature > 0, "stage.temperature must be > 0"),
            (self.min_completion_length >= 0, "stage.min_completion_length must be >= 0"),
            (0 < self.cliprange < 1, "stage.cliprange must be in (0, 1)"),
            (self.loss_type in ("grpo", "dapo", "dr_grpo"), "stage.loss_type must be grpo, dapo or dr_grpo"),
            (self.scale_rewards in ("group", "batch", "none"), "stage.scale_rewards must be group, batch or none"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (stage=rlhf)")

    @property
    def group_size(self) -> int:
        return self.num_generations if self.algorithm == "grpo" else 1

    @property
    def updates_per_rollout(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches


@dataclass
class FinalConfig:
    """What `<run_dir>/final/` holds when training completes."""

    weights: str = "last"  # last: the weights at the end; best: best.ckpt (lowest val/loss)

    def __post_init__(self) -> None:
        if self.weights not in ("last", "best"):
            raise ValueError(f"final.weights must be last or best, got {self.weights!r}")


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
    final: FinalConfig = field(default_factory=FinalConfig)  # what <run_dir>/final/ holds
    trainer: dict[str, Any] = field(default_factory=dict)  # lightning.pytorch.Trainer arguments
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> _target_ config (null disables one)
    logger: dict[str, Any] = field(default_factory=dict)
    seed: int = 1337
    compile: bool = False  # torch.compile the backbone (training forwards) and the decode step (rollouts, evals)
    outputs: str = "outputs"  # where the stages' run dirs live (and where init_from=auto finds the parent's)
    run_dir: str = "${outputs}/${stage.name}_${model.name}"
    init_from: Optional[str] = "auto"  # auto: <outputs>/<stage.parent>_<model.name>/final; or a folder / .ckpt; null
    init_sha256: Optional[str] = None  # filled in by build(): sha256 of the init weights file
    resume: Optional[str] = None  # "auto" (latest loadable checkpoint of run_dir) or a .ckpt path
    resume_allow_changes: bool = False  # resume although hyper-parameters differ from the checkpoint's
    overwrite: bool = False  # start fresh in a run_dir that already holds checkpoints (they are deleted)
    prompt: str = "To be, or not to be"  # what debug (and later eval) generates from
    optimized_metric: str = "val/loss"  # what a multirun job returns to the sweeper


ConfigStore.instance().store(name="schema", node=Config)
# The one stage table, in chain order: name -> schema. Config, train (minillm/stages: the module whose `schema` it
# is) and the report (run_names) read it. A stage YAML pulls its schema in with `- /stage_schema/<name>@stage`.
STAGES = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "reward": RewardConfig,
    "rlhf": RLHFConfig,
}
for _name, _schema in STAGES.items():
    ConfigStore.instance().store(group="stage_schema", name=_name, node=_schema)


def rlhf_run(algorithm: str) -> str:
    """The run name of stage=rlhf: PPO and GRPO runs get different run dirs (rlhf_<model>, rlhf-grpo_<model>)."""
    return "rlhf" if algorithm == "ppo" else f"rlhf-{algorithm}"


def run_names() -> list[str]:
    """Every run a chain can hold, in chain order: each stage, and rlhf once per algorithm."""
    return [run for name in STAGES for run in ([rlhf_run(a) for a in RLHF_ALGORITHMS] if name == "rlhf" else [name])]


def _wandb_offline() -> bool:
    """logger=wandb logs offline unless the user is logged in (an API key in the environment or ~/.netrc)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return True


OmegaConf.register_new_resolver("wandb_offline", _wandb_offline)
OmegaConf.register_new_resolver("rlhf_run", rlhf_run)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m minillm.train <overrides>` would run with, composed from Python."""
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its search path
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_config(cfg: DictConfig) -> Config:
    """Typed, validated dataclasses (runs every __post_init__). Group configs stay plain dicts. A key that no
    schema has (`+optim.lrr=1` gets past Hydra) is an error naming it and the keys that exist."""
    _check_keys(cfg, "")
    _check_numbers(OmegaConf.to_container(cfg, resolve=True), "")
    return OmegaConf.to_object(cfg)


# Lightning Trainer arguments that count (the trainer group is untyped: its schema is Lightning's signature).
TRAINER_COUNTS = (
    "max_steps",
    "min_steps",
    "max_epochs",
    "min_epochs",
    "accumulate_grad_batches",
    "log_every_n_steps",
    "num_nodes",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
)


def _check_numbers(node: Any, where: str) -> None:
    """Every number finite (`optim.lr=inf` would train NaN weights), and the trainer's counts whole numbers
    (`trainer.max_steps=1.5` is not a step count)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_numbers(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_numbers(value, f"{where}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ValueError(f"{where}={node}: every number in the config must be finite; set a finite value")
    if where.startswith("trainer.") and where.removeprefix("trainer.") in TRAINER_COUNTS:
        if isinstance(node, float) or isinstance(node, bool):
            raise ValueError(f"{where}={node}: a count must be a whole number (e.g. {where}={max(int(node), 1)})")


def _check_keys(node: DictConfig, where: str) -> None:
    schema = OmegaConf.get_type(node)
    if not isinstance(schema, type) or not hasattr(schema, "__dataclass_fields__"):
        return
    known = [f.name for f in fields(schema)]
    for key in node.keys():
        path = f"{where}{key}"
        if key not in known:
            raise ValueError(
                f"unknown config key {path}; the keys of {where.rstrip('.') or 'the config'} are: {', '.join(known)}"
            )
        value = node._get_node(key)
        if isinstance(value, DictConfig):
            _check_keys(value, path + ".")


def resolved_dict(cfg: DictConfig) -> dict:
    """The whole config as plain containers, interpolations resolved (for snapshots and checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)


def model_preset(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of conf/model/<name>.yaml (plus `key=value` overrides), validated."""
    cfg = compose([f"model={name}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return OmegaConf.to_object(cfg.model)
