"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank adapters on its linear layers.

A target layer y = W x becomes y = W x + (α / r) · B A dropout(x), with A (r × in) initialised as PEFT does
(Kaiming-uniform) and B (out × r) at zero, so a fresh adapter leaves the model's outputs unchanged. Only A, B
(and a reward/value model's scalar head) train; W stays frozen at the parent's weights.

How a stage uses it (`model.lora.r > 0`, minillm/stages/base.py):
- `add_adapters` wraps the target layers in place: the frozen weight keeps its name (`…q_proj.weight`), the
  adapter adds `…q_proj.lora_A.weight` / `…q_proj.lora_B.weight`, PEFT's names under its prefix;
- the reference of DPO/RLHF is `WithoutAdapters(policy)`: the same modules run with every adapter off, so the
  frozen base is held in memory once;
- checkpoints hold the trainable tensors only; a resume takes the base from `init_from` again (checked by the
  sha256 of its weights);
- `final/` holds `merged(model)` in the usual layout (every exporter and loader reads it unchanged) and
  `final/adapter/`: PEFT's `adapter_config.json` + `adapter_model.safetensors`, which `peft` loads onto the
  transformers export of the parent model.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from minillm.model import LoRAConfig, MiniGPT, RewardModel

ADAPTER_DIR = "adapter"  # final/adapter/
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of a wrapped model's own names


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter. `weight` (and `bias`, Qwen2's q/k/v) are the wrapped layer's own
    parameters (same names, same tensors); `adapter_on` False runs the layer as it was."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kwargs = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, config.r, **kwargs)
        self.lora_B = nn.Linear(config.r, self.out_features, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling
        self.adapter_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_on:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The adapter as a weight update, (out, in): merged weight = weight + delta."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_adapters(model: nn.Module, config: LoRAConfig) -> None:
    """Wrap every target layer of `model` (a MiniGPT, a RewardModel) in place, then freeze everything but the
    adapters and a scalar head (`score`)."""
    for module in list(model.modules()):
        for child, layer in list(module.named_children()):
            if child in config.target_modules and isinstance(layer, nn.Linear):
                setattr(module, child, LoRALinear(layer, config))
    if not adapters(model):
        raise ValueError(f"model.lora.target_modules {config.target_modules} matched no linear layer")
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))


def is_trainable(name: str) -> bool:
    """A parameter a LoRA run trains: an adapter matrix, or the scalar head of a reward/value model."""
    return ".lora_A." in name or ".lora_B." in name or name == "score.weight" or name.endswith(".score.weight")


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    layers = adapters(model).values()
    for layer in layers:
        layer.adapter_on = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_on = True


class WithoutAdapters:
    """The frozen base of a LoRA model as a reference model: calls run the model's own modules with every
    adapter off (no second copy of the weights). Not an nn.Module: never optimized, never in a checkpoint."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def sequence_scores(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model.sequence_scores(*args, **kwargs)

    def to(self, *args, **kwargs) -> WithoutAdapters:  # it lives where the policy lives
        return self

    def eval(self) -> WithoutAdapters:
        return self


def merged(model: nn.Module) -> nn.Module:
    """A plain copy of `model` (MiniGPT or RewardModel) with every adapter folded into its weight: the same
    outputs, the usual parameter names, `lora.r = 0` in its config."""

    if isinstance(model, RewardModel):
        out = merged(model.model)
        return RewardModel.from_trunk(out, model.score.weight.detach())
    if not isinstance(model, MiniGPT):
        raise TypeError(f"cannot merge adapters of a {type(model).__name__}")
    config = replace(model.config, lora=LoRAConfig())
    out = MiniGPT(config).to(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    layers = adapters(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        owner = name.removesuffix(".weight")
        state[name] = tensor + layers[owner].delta().detach() if owner in layers else tensor
    out.load_state_dict(state)
    return out.eval()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
    of a causal LM (a MiniGPT: our names are the HF names without the `model.` prefix) or a reward model (its
    trunk, plus `score.weight`, as PEFT saves a sequence classifier's head)."""

    trunk = model.model if isinstance(model, RewardModel) else model
    out = {
        f"{PEFT_PREFIX}model.{name}": p.detach().contiguous().cpu()
        for name, p in trunk.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }
    if isinstance(model, RewardModel):
        out[f"{PEFT_PREFIX}score.weight"] = model.score.weight.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, config: LoRAConfig, out_dir: Path, base: str | None = None) -> Path:
    """`out_dir`/adapter_config.json + adapter_model.safetensors, PEFT's layout. `base`: where the model the
    adapter applies to was (the parent's final/; PEFT loads the adapter onto its transformers export)."""

    reward = isinstance(model, RewardModel)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": ["score"] if reward else None,
        "use_rslora": False,
        "use_dora": False,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return out_dir


def trainable_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a LightningModule state dict that a LoRA run trains (what its checkpoints hold)."""
    return {k: v for k, v in state.items() if is_trainable(k)}
