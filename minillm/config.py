"""Every config schema (dataclasses; the YAML files under conf/ hold only values), registered in Hydra's ConfigStore
by `register()` when a config is first composed. `TokenizerConfig` lives beside its code in tokenizer.py. `trainer`,
`callbacks` and `logger` are Lightning `_target_` YAML: their schema is Lightning's own signature, checked when
`build()` instantiates them, before any tensor exists. Everything else is typed here, so a typo or a wrong type fails
at compose time.

No torch here, and Hydra and OmegaConf only once a config is composed: the library reads these dataclasses (the
model's shape, generation, evaluation) without either, and `minillm <command> --help` or a mistyped key answers
without loading torch.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from minillm.tokenizer import TokenizerConfig

if TYPE_CHECKING:
    from omegaconf import DictConfig


# ---- the model, generation and evaluation: what the library reads too ----

MAX_BLOCK_SIZE = 65536


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the tensor types `minillm export format=gguf` writes

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # our (= Llama's) names


@dataclass
class LoRAConfig:
    """`model.lora`: r = 0 trains every weight (no adapters)."""

    r: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"invalid model config: lora.r must be >= 0 (0 = no adapters), got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"invalid model config: lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid model config: lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [name for name in self.target_modules if name not in LORA_TARGETS]
        if unknown or not self.target_modules:
            raise ValueError(
                f"invalid model config: lora.target_modules {list(self.target_modules)} names no layer of this "
                f"model ({', '.join(unknown) or 'empty'}); the valid names are {', '.join(LORA_TARGETS)}"
            )

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class ModelConfig:
    """Shape of a MiniGPT. Also the Hydra schema of the `model` group and the `minillm.json` saved with weights."""

    name: str = "custom"  # the preset's name; names the run directory
    vocab_size: int = 0  # 0 = take it from the tokenizer when the model is built
    block_size: int = 256  # longest sequence the model is trained on
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 8
    n_kv_head: int = 4  # must divide n_head; == n_head is plain multi-head attention
    intermediate_size: int = 0  # SwiGLU width (per expert); 0 = 8/3 * n_embd rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    attention_bias: bool = False  # q/k/v projections with a bias (Qwen2's layout); the output projection has none
    # the longest context the weights are meant for (exported as max_position_embeddings); 0 = block_size. A model
    # imported from Hugging Face keeps its own, whatever block_size it is fine-tuned at
    max_position_embeddings: int = 0
    init_std: float = 0.02
    gradient_checkpointing: bool = False  # training: recompute each block's activations in the backward
    # mixture of experts (n_experts = 0: dense MLP)
    n_experts: int = 0
    n_experts_per_tok: int = 2
    n_shared_experts: int = 0  # width of the shared expert, in units of intermediate_size
    aux_loss_coef: float = 0.01
    # LoRA fine-tuning (r > 0): the stage adds adapters to these layers and trains only them (minillm/lora.py);
    # not part of the architecture: exported weights are merged and say r = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # read back from minillm.json or a checkpoint's plain config
            self.lora = LoRAConfig(**self.lora)
        checks = [
            (self.n_layer > 0, f"n_layer must be > 0, got {self.n_layer}"),
            (
                self.n_head > 0 and self.n_embd % self.n_head == 0,
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
            ),
            (
                self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})",
            ),
            (
                self.n_head > 0 and (self.n_embd // self.n_head) % 2 == 0,
                f"head size n_embd / n_head = {self.n_embd // max(self.n_head, 1)} must be even for RoPE",
            ),
            (
                0 < self.block_size <= MAX_BLOCK_SIZE,
                f"block_size must be in 1..{MAX_BLOCK_SIZE} (the largest context the KV cache and RoPE tables are "
                f"built for), got {self.block_size}",
            ),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.n_experts >= 0, f"n_experts must be >= 0, got {self.n_experts}"),
            (
                self.n_experts == 0 or 0 < self.n_experts_per_tok <= self.n_experts,
                f"n_experts_per_tok ({self.n_experts_per_tok}) must be in 1..n_experts ({self.n_experts})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid model config: {message}")

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: intermediate_size, or 8/3 * n_embd rounded up to a multiple of 64."""
        return self.intermediate_size if self.intermediate_size > 0 else 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = True  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    stop: list[str] = field(default_factory=list)  # stop when the new text contains one; it is cut off
    eos_token_ids: Optional[list[int]] = None  # default: the tokenizer's </s> and <|im_end|>
    seed: Optional[int] = None  # None: a fresh random seed per call
    # transformers' meaning: prompt + new tokens (the prompt's padded width). When set it decides the budget and
    # max_new_tokens is not read.
    max_length: Optional[int] = None

    def new_tokens(self, prompt_len: int) -> int:
        """How many tokens to generate after a prompt of `prompt_len` tokens."""
        return self.max_new_tokens if self.max_length is None else max(self.max_length - prompt_len, 0)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.max_length is None or self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}"),
            (self.temperature > 0, f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.num_beams == 1 or not self.do_sample, "beam search is deterministic: set do_sample=False"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid generation config: {message}")


def generation_config(command: Any) -> GenerationConfig:
    """The GenerationConfig part of a config that extends it (the generate and chat commands)."""
    return GenerationConfig(**{f.name: getattr(command, f.name) for f in fields(GenerationConfig)})


TASKS = ("bpb", "verifiable", "preference", "reward", "kl", "samples")  # what `minillm eval` can measure


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    data_dir: str = "data/builtin"
    text: Optional[str] = None  # bpb text (.txt / .jsonl); None: held-out pretraining records of data_dir
    family: str = "verifiable"  # eval/<family>.jsonl for exact match
    pairs: list[str] = field(
        default_factory=lambda: ["reviews_zh", "chatterbot_pairs", "kjv_pairs", "verifiable_pairs"]
    )
    reference: Optional[str] = None  # DPO's reward accuracy and the KL are relative to this model
    prompts: Optional[str] = None  # reward task prompts; None: eval/<family>.jsonl
    reward: str = "verifiable"  # rule from minillm.reward_rules
    reward_model: Optional[str] = None  # also score with this reward model
    gold_reward_model: Optional[str] = None  # and with this one, trained apart and never optimized against
    limit: int = 200  # records per task (and per pairs file)
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 0
    out: Optional[str] = None  # eval.json path; None: next to the model

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"eval.tasks: unknown {unknown}; known: {list(TASKS)}")


# eval.json: where it goes, its layout's version, the numbers tables show
EVAL_VERSION = 4  # bump when a task's meaning, layout or sampling changes (the report recomputes then)


def output_path(model_path: Path, config: EvalConfig) -> Path:
    if config.out:
        return Path(config.out)
    return (model_path.parent if model_path.is_file() else model_path) / "eval.json"


def headline(result: dict) -> dict[str, float]:
    """The numbers of a result that go in tables: bpb, task accuracy, preference accuracy, the replies to the
    reward task's prompts (scores, length, degenerate share, distinct-2)."""
    t = result["tasks"]
    reward = t.get("reward", {})
    rows = {
        "bpb": t.get("bpb", {}).get("bpb"),
        "val loss (per token)": t.get("bpb", {}).get("loss"),
        "exact match": t.get("verifiable", {}).get("exact_match"),
        "preference accuracy": t.get("preference", {}).get("accuracy"),
        "reward accuracy": t.get("preference", {}).get("reward_accuracy"),
        "mean reward": reward.get("mean_reward") if reward.get("n") else None,  # None: the rule scored no reply
        "reward-model score": reward.get("reward_model_score"),
        "gold score": reward.get("gold_score"),
        "median length": reward.get("median_length"),
        "KL": t.get("kl", {}).get("kl"),
        "degenerate": reward.get("degenerate_fraction"),
        "distinct-2": reward.get("distinct_2"),
    }
    if "verifiable" in t:
        rows["n exact match"] = t["verifiable"]["n"]  # questions asked: a target's binomial margin needs them
    for task, v in t.get("verifiable", {}).get("tasks", {}).items():
        rows[f"exact match {task}"] = v["exact_match"]
        rows[f"n exact match {task}"] = v["n"]
    for name, v in t.get("reward_model", {}).items():
        rows[f"pairwise accuracy {name}"] = v["accuracy"]
    return {k: v for k, v in rows.items() if v is not None}


# ---- the train config ----


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
    # where the sample starts in the records' hash order: sample_ratio=0.5 at offsets 0 and 0.5 are disjoint halves
    # (the demo's reward model and its gold judge train on different halves of the same pairs)
    sample_offset: float = 0.0
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
        if not 0.0 <= self.sample_offset < 1.0:
            raise ValueError(f"data.sample_offset must be in [0, 1), got {self.sample_offset}")


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


# The one stage table, in chain order: name -> schema. Config, train (minillm/stages: the module whose `schema` it
# is) and the report (run_names) read it. A stage YAML pulls its schema in with `- /stage_schema/<name>@stage`.
STAGES = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "reward": RewardConfig,
    "rlhf": RLHFConfig,
}


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


_registered = False


def register() -> None:
    """The train config's schemas into Hydra's ConfigStore ("schema", and "stage_schema/<name>" that a stage YAML
    pulls in) and our resolvers into OmegaConf: what composing conf/ needs, done once per process."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="schema", node=Config)
    for name, schema in STAGES.items():
        ConfigStore.instance().store(group="stage_schema", name=name, node=schema)
    for name, resolver in (("wandb_offline", _wandb_offline), ("rlhf_run", rlhf_run)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("div"):  # integer division: a step count from a budget and a batch size
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))
    if not OmegaConf.has_resolver("sweep_dir"):  # cached: every job of a sweep gets the sweep's value
        OmegaConf.register_new_resolver("sweep_dir", _sweep_dir, use_cache=True)
    _registered = True


def _sweep_dir(base: str, overrides) -> str:
    """hydra.sweep.dir of `minillm train -m`: `new_or_resumed_sweep_dir`."""
    return str(new_or_resumed_sweep_dir(Path(base), [str(o) for o in overrides]))


# ---- a sweep's folder: a rerun of the same sweep with resume=auto finds it ----

# overrides that say how to run a sweep, not what it trains: a rerun with them is the same sweep
HOW_KEYS = ("resume", "resume_allow_changes", "overwrite", "hydra.")


def sweep_key(overrides: list[str]) -> list[str]:
    """The overrides that make a sweep what it is (without those that say how to run it), sorted."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(HOW_KEYS))


def find_sweep(base: Path, overrides: list[str]) -> Path | None:
    """The newest sweep under `base` (its `<time>/multirun.yaml`) run with the same overrides, if any."""
    import yaml

    key = sweep_key(overrides)
    for folder in sorted((p for p in base.glob("*") if (p / "multirun.yaml").is_file()), reverse=True):
        try:
            saved = yaml.safe_load((folder / "multirun.yaml").read_text(encoding="utf-8"))
            if sweep_key(saved["hydra"]["overrides"]["task"]) == key:
                return folder
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
    return None


def new_or_resumed_sweep_dir(base: Path, overrides: list[str]) -> Path:
    """`base/<time>`; with resume=auto among the overrides, the newest earlier sweep of the same overrides (its
    finished jobs are skipped, its interrupted ones resume from their checkpoints)."""
    if any(o.lstrip("+") == "resume=auto" for o in overrides):
        found = find_sweep(base, overrides)
        if found is not None:
            return found
    return base / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `python -m minillm.train <overrides>` would run with, composed from Python."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its search path
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def to_config(cfg: DictConfig) -> Config:
    """Typed, validated dataclasses (runs every __post_init__). Group configs stay plain dicts. A key that no
    schema has (`+optim.lrr=1` gets past Hydra) is an error naming it and the keys that exist."""
    from omegaconf import OmegaConf

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
    from omegaconf import DictConfig, OmegaConf

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
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def model_preset(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of conf/model/<name>.yaml (plus `key=value` overrides), validated."""
    from omegaconf import OmegaConf

    cfg = compose([f"model={name}", *(f"model.{k}={v}" for k, v in overrides.items())])
    return OmegaConf.to_object(cfg.model)
