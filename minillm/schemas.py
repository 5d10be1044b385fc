"""The value-only config dataclasses the library and the command line share: the model's shape, generation and
evaluation. No torch here (nor Hydra): `minillm <command> --help`, `--cfg job` and a mistyped key answer without
loading either. The modules whose code they configure re-export them (`minillm.model.ModelConfig`,
`minillm.generate.GenerationConfig`, `minillm.evaluation.EvalConfig`); the train config's other groups are in
config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

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
EVAL_VERSION = 3  # bump when a task's meaning, layout or sampling changes (the report recomputes then)


def output_path(model_path: Path, config: EvalConfig) -> Path:
    if config.out:
        return Path(config.out)
    return (model_path.parent if model_path.is_file() else model_path) / "eval.json"


def headline(result: dict) -> dict[str, float]:
    """The numbers of a result that go in tables: bpb, task accuracy, preference accuracy, reward, distinct-2."""
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
        "median length": reward.get("median_length"),
        "KL": t.get("kl", {}).get("kl"),
        "distinct-2": t.get("samples", {}).get("distinct_2"),
    }
    for task, v in t.get("verifiable", {}).get("tasks", {}).items():
        rows[f"exact match {task}"] = v["exact_match"]
    for name, v in t.get("reward_model", {}).items():
        rows[f"pairwise accuracy {name}"] = v["accuracy"]
    return {k: v for k, v in rows.items() if v is not None}
