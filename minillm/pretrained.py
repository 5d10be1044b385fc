"""The one on-disk format for trained weights: a Hugging Face style folder.

    config.json          LlamaForCausalLM config for dense models (a minillm config for MoE)
    model.safetensors    weights under Llama tensor names (`model.layers.0.self_attn.q_proj.weight`, ...);
                         with tied embeddings `lm_head.weight` is left out, as HF does
    tokenizer.model      the sentencepiece model, with tokenizer_config.json / special_tokens_map.json so that
                         transformers' AutoTokenizer gives the same ids (no extra BOS, no dummy prefix) and
                         knows the ChatML chat template; generation_config.json with the EOS ids
    minillm.json         our ModelConfig, format version, tokenizer sha256, kind (lm / reward)

A reward model (kind "reward") adds its scalar head as `score.weight` and says LlamaForSequenceClassification
(num_labels 1) in config.json; `load_reward_model` opens it, `load_pretrained` gives its trunk. One trained with
`stage.likelihood_weight` adds that weight as a scalar `likelihood_weight`: transformers leaves it unused and reads
the head alone, without the likelihood term (minillm.model.RewardModel).

`load_pretrained` also opens a Lightning training checkpoint (`*.ckpt`, loaded with weights_only=True): its
`hyper_parameters["config"]["model"]` is the ModelConfig, its `state_dict` holds the backbone under a `model.`
prefix and the tokenizer is the `tokenizer.model` beside it (or one folder up).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from minillm.files import weight_files
from minillm.hf_tokenizer import JSON_FILE, open_tokenizer
from minillm.model import MAX_BLOCK_SIZE, MiniGPT, ModelConfig, RewardModel
from minillm.tokenizer import CHAT_TEMPLATE, MODEL_FILE, Tokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "config.json", "minillm.json"
HF_PREFIX = "model."  # HF keeps everything but lm_head under `model.`


def to_hf_state_dict(model: MiniGPT) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if model.config.tie_embeddings:
                continue
            out[name] = tensor
        else:
            out[HF_PREFIX + name] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def from_hf_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(HF_PREFIX): v for k, v in tensors.items()}


def hf_config(config: ModelConfig, tokenizer: Tokenizer, kind: str = "lm") -> dict:
    common = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings or config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    }
    if config.is_moe:  # not loadable by transformers yet: the interop work decides the MoE layout
        return {"architectures": ["MiniGPTMoE"], "model_type": "minillm_moe", **common}
    family = "Qwen2" if config.attention_bias else "Llama"  # q/k/v biases and nothing else: Qwen2's layout
    head = "ForSequenceClassification" if kind == "reward" else "ForCausalLM"
    if kind == "reward":
        common |= {"num_labels": 1}
    layout = (
        {"use_sliding_window": False, "max_window_layers": config.n_layer}
        if config.attention_bias
        else {"attention_bias": False, "mlp_bias": False}
    )
    return {
        "architectures": [family + head],
        "model_type": family.lower(),
        **layout,
        "attention_dropout": 0.0,
        **common,
    }


def save_pretrained(model: MiniGPT | RewardModel, tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write the folder described above (kind "reward" for a RewardModel); returns it."""
    if model.config.vocab_size < tokenizer.vocab_size:  # Hugging Face models often pad their embedding table
        raise ValueError(f"model vocab_size {model.config.vocab_size} < tokenizer vocab size {tokenizer.vocab_size}")
    kind = "reward" if isinstance(model, RewardModel) else "lm"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "reward":
        tensors = to_hf_state_dict(model.model) | {"score.weight": model.score.weight.detach().contiguous().cpu()}
        if model.likelihood_weight is not None:
            tensors["likelihood_weight"] = model.likelihood_weight.detach().float().cpu()
    else:
        tensors = to_hf_state_dict(model)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(hf_config(model.config, tokenizer, kind), indent=2))
    tokenizer.save(out)
    if isinstance(tokenizer, Tokenizer):
        write_hf_tokenizer_files(tokenizer, out, model.config.block_size)
    else:  # a Hugging Face tokenizer: its own files (and template) were copied; the stop ids for generation
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted({tokenizer.eos_id, tokenizer.im_end_id})}
        (out / "generation_config.json").write_text(json.dumps(generation | {"pad_token_id": tokenizer.pad_id}))
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tokenizer_sha256": tokenizer.sha256,
        "model": asdict(model.config),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def write_hf_tokenizer_files(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    """tokenizer_config.json, special_tokens_map.json, generation_config.json for transformers."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,  # our pretraining puts </s> between documents and no <s>
        "add_eos_token": False,
        "legacy": True,  # encode with the sentencepiece model as is: identity normalisation, no dummy prefix
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i, t in enumerate(specials)
        },
        "chat_template": CHAT_TEMPLATE,
        **SPECIAL,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(
        json.dumps({**SPECIAL, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2)
    )
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": [tokenizer.eos_id, tokenizer.im_end_id],
        "pad_token_id": tokenizer.pad_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


# config.json fields whose other values change what the model computes, with the value MiniGPT implements, per
# model_type: a folder that sets another is refused by name, since loading it would silently compute other logits
# than transformers. Qwen2 always has q/k/v biases (attention_bias=True here) and its `sliding_window` size only
# counts with use_sliding_window=true.
COMMON_HF_FIELDS = {
    "hidden_act": ("silu", "only SiLU-gated (SwiGLU) MLPs are implemented"),
    "rope_scaling": (None, "RoPE scaling (linear, dynamic, yarn, llama3, ...) is not implemented"),
    "pretraining_tp": (1, "tensor-parallel slicing of the pretraining run (pretraining_tp > 1) is not implemented"),
    "use_sliding_window": (False, "sliding-window attention is not implemented"),
}
IMPLEMENTED_HF_FIELDS = {
    "llama": COMMON_HF_FIELDS
    | {
        "attention_bias": (False, "Llama's attention_bias adds biases to all four attention projections"),
        "mlp_bias": (False, "MLP projections have no bias here"),
        "sliding_window": (None, "sliding-window attention is not implemented"),
    },
    "qwen2": COMMON_HF_FIELDS,
}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM (SmolLM2, TinyLlama, ...)", "qwen2": "Qwen2ForCausalLM (Qwen2.5)"}


def model_config_from_hf(config: dict, where: Path) -> ModelConfig:
    """Our ModelConfig from a transformers config.json of a LlamaForCausalLM or Qwen2ForCausalLM (a folder without
    minillm.json). A field that would make transformers compute something MiniGPT does not (IMPLEMENTED_HF_FIELDS)
    is an error naming it."""
    model_type = config.get("model_type")
    if model_type not in IMPLEMENTED_HF_FIELDS:
        raise ValueError(
            f"{where}: model_type {model_type!r} cannot be imported; supported: "
            + ", ".join(f"{k} ({v})" for k, v in HF_ARCHITECTURES.items())
        )
    if config.get("num_experts") or config.get("num_local_experts"):
        raise ValueError(f"{where}: a mixture-of-experts {model_type} folder cannot be imported (dense models only)")
    for key, (implemented, why) in IMPLEMENTED_HF_FIELDS[model_type].items():
        if key in config and config[key] not in (implemented, None if implemented is False else implemented):
            raise ValueError(
                f"{where}: {key}={config[key]!r} is not supported ({why}); minillm would compute other logits than "
                f"transformers from this folder, so it refuses it. Supported: {key}={implemented!r}"
            )
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps the RoPE settings here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{where}: rope_parameters.rope_type={rope['rope_type']!r} is not supported (RoPE scaling is not "
            "implemented); minillm would compute other logits than transformers from this folder, so it refuses it"
        )
    heads = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // heads) != config["hidden_size"] // heads:
        raise ValueError(f"{where}: head_dim must be hidden_size / num_attention_heads to import")
    return ModelConfig(
        name="hf",
        vocab_size=config["vocab_size"],
        n_layer=config["num_hidden_layers"],
        n_embd=config["hidden_size"],
        n_head=heads,
        n_kv_head=config.get("num_key_value_heads", heads),
        intermediate_size=config["intermediate_size"],
        block_size=min(config.get("max_position_embeddings", 2048), MAX_BLOCK_SIZE),
        max_position_embeddings=config.get("max_position_embeddings", 0),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        tie_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=model_type == "qwen2",
    )


def _model_config(d: dict, where: Path) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown model config keys {unknown}; written by a newer minillm?")
    return ModelConfig(**d)


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MiniGPT, Tokenizer]:
    """(model in eval mode, tokenizer) from an exported folder or a training checkpoint."""
    model, tokenizer, _ = load_parts(Path(path), map_location)
    return model, tokenizer


def load_reward_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer]:
    """(reward model in eval mode, tokenizer) from a `stage=reward` final/ folder or checkpoint."""
    model, tokenizer, head = load_parts(Path(path), map_location)
    if head is None:
        raise ValueError(
            f"{path} is a language model, not a reward model (it has no score head); train one with "
            "`python -m minillm.train stage=reward` and point at its final/ folder"
        )
    return RewardModel.from_trunk(model, *head).eval(), tokenizer


Head = tuple[torch.Tensor, Optional[float]]  # a reward model's (score head weight, likelihood weight or None)


def is_model_id(text: str) -> bool:
    """Whether `text` reads as a Hugging Face model id, `<owner>/<name>`."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def find_model(name: str | Path) -> Path:
    """A model folder or checkpoint by path, or a Hugging Face model id (`HuggingFaceTB/SmolLM2-135M-Instruct`)
    found in the local Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
    minillm never downloads: a model that is not there is an error saying how to fetch it."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if not is_model_id(text):
        raise FileNotFoundError(f"no model at {path}: expected an exported folder, a .ckpt file or a model id")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"no folder {path}, and the Hugging Face model {text} is not in the local cache "
            f"{constants.HF_HUB_CACHE}: minillm never downloads; fetch it first (`hf download {text}`, or "
            "huggingface_hub.snapshot_download), or point at a folder"
        ) from None


def load_parts(path: Path, map_location) -> tuple[MiniGPT, Tokenizer, Head | None]:
    """(trunk, tokenizer, the reward head or None for a language model). `path` may be a model id in the local
    Hugging Face cache (`find_model`)."""
    path = find_model(path)
    if path.is_file():
        return _load_checkpoint(path, map_location)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        if (path / CONFIG_FILE).is_file() and weight_files(path):  # a transformers folder
            hf = json.loads((path / CONFIG_FILE).read_text())
            meta = {"model": asdict(model_config_from_hf(hf, path / CONFIG_FILE))}
        else:
            raise FileNotFoundError(
                f"{path} has no {META_FILE} (nor config.json + model.safetensors): not a model folder"
            )
    else:
        meta = json.loads(meta_path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta['format_version']} is newer than this minillm "
            f"({FORMAT_VERSION}); upgrade minillm"
        )
    tokenizer = open_tokenizer(path)
    _check_tokenizer(meta.get("tokenizer_sha256"), tokenizer, meta_path)
    model = MiniGPT(_model_config(meta["model"], meta_path))
    weights = {}
    for file in weight_files(path) or [path / WEIGHTS_FILE]:
        try:
            weights |= load_file(file, device=str(map_location))
        except Exception as e:  # safetensors' own errors say what is wrong with the bytes, not where or what to do
            raise ValueError(
                f"cannot read the weights {file} ({e}): the file is damaged or not a safetensors file. Export the "
                "model again (the run's final/ or python -m minillm.export), or copy the folder again"
            ) from None
    state = from_hf_state_dict(weights)
    score, weight = state.pop("score.weight", None), state.pop("likelihood_weight", None)
    _load_state(model, state, path / WEIGHTS_FILE)
    return model.eval(), tokenizer, None if score is None else (score, None if weight is None else float(weight))


def _load_checkpoint(path: Path, map_location) -> tuple[MiniGPT, Tokenizer, Head | None]:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle payload, not a checkpoint at all
        raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e
    if isinstance(ckpt, dict) and ckpt.get("lora"):
        raise ValueError(
            f"{path} is a LoRA training checkpoint: it holds the adapters only, not the weights they apply to. Use "
            "the run's final/ (adapters merged into the weights), or resume the run to finish it"
        )
    try:
        hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        config = _model_config(dict(hparams["config"]["model"]), path)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a minillm training checkpoint (missing {e})") from e
    candidates = [path.parent, path.parent.parent]
    folder = next((c for c in candidates if (c / MODEL_FILE).is_file() or (c / JSON_FILE).is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"no {MODEL_FILE} or {JSON_FILE} next to {path}; looked in {[str(c) for c in candidates]}"
        )
    tokenizer = open_tokenizer(folder)
    _check_tokenizer(hparams.get("tokenizer_sha256"), tokenizer, path)
    model = MiniGPT(config)
    backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    _load_state(model, backbone, path)
    if "score.weight" not in state:
        return model.eval(), tokenizer, None
    weight = state.get("likelihood_weight")  # a reward-stage checkpoint has its head
    return model.eval(), tokenizer, (state["score.weight"], None if weight is None else float(weight))


def _check_tokenizer(expected: str | None, tokenizer: Tokenizer, where: Path) -> None:
    if expected and expected != tokenizer.sha256:
        raise ValueError(
            f"{where} was trained with tokenizer sha256 {expected[:12]}…, but {tokenizer.path} has "
            f"sha256 {tokenizer.sha256[:12]}…: use the tokenizer saved with these weights"
        )


def _load_state(model: MiniGPT, state: dict[str, torch.Tensor], where: Path) -> None:
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = {
        k: v.shape for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_embeddings)
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {names[:5]}{' …' if len(names) > 5 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        )
        raise ValueError(f"{where} does not match its model config ({detail})")
    model.load_state_dict(state, strict=False)
