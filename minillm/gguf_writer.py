"""GGUF export for llama.cpp (and ollama, LM Studio, ...): `python -m minillm.export model_path=... format=gguf`.

Written with the `gguf` package (llama.cpp's own writer, the `gguf` extra) as architecture "llama":
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`; `output` only when the
  embeddings are not tied: llama.cpp then reads the embedding matrix for the head);
- q_proj/k_proj rows permuted from the rotate-half RoPE layout (ours and transformers') to the interleaved pairs
  llama.cpp's llama architecture rotates, as llama.cpp's converter does for Llama checkpoints;
- the sentencepiece vocabulary as tokenizer model "llama" (pieces, scores, types: control for our six special
  tokens' markers, byte for the fallback bytes), no BOS/EOS added, no space prefix (our tokenizer has none);
  EOS `</s>` and end-of-turn `<|im_end|>` both stop generation; the ChatML template rides along;
- weights in f32, f16, bf16 or q8_0 (`gguf.type`); norms stay f32, and a matrix whose rows are not a whole
  number of q8_0 blocks (32) falls back to f16.
Dense language models only: a mixture-of-experts model or a reward model is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minillm.config import GGUF_TYPES as TYPES
from minillm.model import MiniGPT
from minillm.tokenizer import CHAT_TEMPLATE, Tokenizer

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    top = {
        "embed_tokens.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)  # layers.N.<module>.weight
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order (per head: first halves, then second halves of the
    rotated pairs) to interleaved pairs (x0, x(D/2), x1, x(D/2+1), ...), the order llama.cpp's llama rotates."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def token_types(tokenizer: Tokenizer) -> list[int]:
    import gguf

    sp, kinds = tokenizer.sp, gguf.TokenType
    out = []
    for i in range(tokenizer.vocab_size):
        if sp.is_unknown(i):
            out.append(kinds.UNKNOWN)
        elif sp.is_control(i):
            out.append(kinds.CONTROL)
        elif sp.is_byte(i):
            out.append(kinds.BYTE)
        elif sp.is_unused(i):
            out.append(kinds.UNUSED)
        else:
            out.append(kinds.NORMAL)
    return [int(t) for t in out]


def write_gguf(
    model: MiniGPT, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", name: str = "minillm"
) -> Path:
    import gguf  # the gguf extra: pip install 'minillm-lab[gguf]' (in a checkout: -e '.[gguf]')

    if dtype not in TYPES:
        raise ValueError(f"gguf.type must be one of {', '.join(TYPES)}, got {dtype!r}")
    config = model.config
    if config.is_moe:
        raise ValueError(
            "GGUF export of a mixture-of-experts model is not supported yet (its experts have no llama layout "
            "here); use the minillm folder itself with minillm.generate / minillm.chat"
        )
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(
            "GGUF export of a model with a Hugging Face tokenizer.json is not supported yet (this writer writes "
            "minillm's sentencepiece vocabulary); use the exported folder, or llama.cpp's convert_hf_to_gguf.py on it"
        )
    if config.attention_bias:
        raise ValueError(
            "GGUF export of a model with q/k/v biases (the Qwen2 layout) is not supported yet (this writer writes "
            "llama.cpp's llama architecture, which has none); use the exported folder, or llama.cpp's own "
            "convert_hf_to_gguf.py on it"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)

    sp = tokenizer.sp
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(tokenizer.vocab_size)])
    writer.add_token_scores([float(sp.get_score(i)) for i in range(tokenizer.vocab_size)])
    writer.add_token_types(token_types(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.im_end_id)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for param, tensor in model.state_dict().items():
        if param == "lm_head.weight" and config.tie_embeddings:
            continue
        w = tensor.detach().float().cpu()
        if param.endswith("q_proj.weight"):
            w = interleave_rope_rows(w, config.n_head)
        elif param.endswith("k_proj.weight"):
            w = interleave_rope_rows(w, config.n_kv_head)
        data = w.numpy()
        if data.ndim == 1 or dtype == "f32":
            writer.add_tensor(gguf_name(param), data.astype(np.float32))
        elif dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % 32):
            writer.add_tensor(gguf_name(param), data.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(param), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
