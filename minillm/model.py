"""MiniGPT: the one decoder-only backbone every stage trains.

Architecture choices, all in this file:
- pre-norm decoder blocks: x + attn(norm(x)), then x + mlp(norm(x));
- RMSNorm computed in fp32 and cast back;
- rotary position embeddings in the "rotate-half" layout (first half / second half of each head), the layout
  Hugging Face Llama uses, so exported weights need no permutation; `rope_theta` configurable;
- grouped-query attention: `n_kv_head` key/value heads shared by `n_head` query heads (equal = plain MHA),
  through the kernel that suits the device (`attention_kernel`, `packed_kernel`, `sdpa_gqa`): SDPA, FlexAttention
  with a document mask for packed rows on CUDA, or the written-out form for bf16 training on a CPU;
- SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases anywhere;
- optional mixture-of-experts MLP: softmax router, top-k experts, optional shared expert behind a sigmoid gate,
  and a load-balancing auxiliary loss that `forward` returns (the caller adds it to its loss);
- tied input/output embeddings (option), dropout on attention probabilities and residual branches;
- GPT-2 style init: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layer);
- a preallocated KV cache and a fixed-shape decode step (`step`, compilable); `position_ids` and `attention_mask`
  let left-padded batches, and `document_ids` packed documents (block-diagonal causal attention), run through the
  same forward;
- optional activation checkpointing per block and torch.compile of the blocks (`compile_layers`).

Parameter names follow Hugging Face Llama (`embed_tokens`, `layers.N.self_attn.q_proj`, ...) so the export is a
rename-free prefix. No Lightning import here: the model is plain PyTorch.

Shapes: B batch, T new tokens, S attended positions (cache + new), C width, H heads, K kv heads, D head dim,
V vocabulary, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.config import LORA_TARGETS, MAX_BLOCK_SIZE, LoRAConfig, ModelConfig  # noqa: F401 (re-exported)

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    FLEX_ATTENTION = True
except ImportError:  # torch < 2.5
    BlockMask, FLEX_ATTENTION = type(None), False

SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=: no K/V copies


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # (B, T, V), or (B, 1, V) with last_only=True; None with hidden_only=True
    aux_loss: torch.Tensor  # scalar; MoE load-balancing loss already scaled by aux_loss_coef, 0 when dense
    cache: Optional[KVCache] = None
    hidden: Optional[torch.Tensor] = None  # (B, T, C) final normalised hidden states (what the heads read)


class KVCache:
    """Preallocated keys/values, one (B, K, max_len, D) tensor per layer (separate buffers: a compiled decode step
    then writes one slot in place instead of rebuilding a stacked cache). `length` positions are filled."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, K, T, D) keys/values after the filled part; return everything so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor):
        """Fixed-shape update (the decode step): write (B, K, 1, D) at cache slot `slot` (a 1-element tensor);
        return the whole preallocated (B, K, max_len, D) (the caller masks the slots not filled)."""
        self.k[layer].index_copy_(2, slot, k.to(self.k[layer].dtype))  # under autocast k/v may be bf16
        self.v[layer].index_copy_(2, slot, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, D) in the rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D). Rotates pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


def attention_kernel(device_type: str, dtype: torch.dtype, training: bool) -> str:
    """Which attention a (non-packed) forward uses, by device, dtype and mode:

    - "explicit" (softmax(q kᵀ/√D) v written out) for bf16 *training on a CPU*: torch's CPU SDPA has a slow bf16
      backward (measured on a Zen 4 CPU: model=tiny trains 13-18% faster written out);
    - "sdpa" everywhere else: FlashAttention / memory-efficient kernels on CUDA in every precision (no (T, S)
      score tensor; grouped K/V as `sdpa_gqa` says), the fused kernel on CPU in fp32 and for decoding.

    Chosen by the module's mode, not by autograd, so a no-grad forward in train mode (RLHF's old log-probs)
    matches the update's forward."""
    return "explicit" if device_type == "cpu" and dtype == torch.bfloat16 and training else "sdpa"


def packed_kernel(device_type: str, dropout: float) -> str:
    """Which attention a packed forward (documents side by side in one row) uses: "flex" (FlexAttention with a
    block-diagonal causal block mask, compiled: no (B, T, T) mask, fully masked blocks skipped) on CUDA, "dense"
    (a (B, 1, T, T) boolean mask through the non-packed path) elsewhere — FlexAttention has no CPU backward in
    torch 2.13 (it raises) — and whenever attention dropout is on (FlexAttention has none)."""
    return "flex" if device_type == "cuda" and dropout == 0.0 and FLEX_ATTENTION else "dense"


def sdpa_gqa(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA takes the grouped K/V heads as they are (`enable_gqa=True`) or repeated per query head. torch
    ≥ 2.5 only. On CUDA only FlashAttention (fp16/bf16, no explicit mask) and the math kernel accept it: a call the
    memory-efficient kernel would serve (fp32, or a padding/document mask) falls back to math with its (T, S) score
    tensor, so those get repeated K/V and keep the efficient kernel. On CPU every case takes it."""
    if not SDPA_GQA:
        return False
    return device_type != "cuda" or (dtype in (torch.float16, torch.bfloat16) and not masked)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, layer: int, cache: Optional[KVCache], slot=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v) if slot is None else cache.write(layer, k, v, slot)  # (B, K, S, D)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, BlockMask):  # packed documents on CUDA
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        elif attention_kernel(q.device.type, q.dtype, self.training) == "explicit":
            y = explicit_attention(q, self._repeat_kv(k), self._repeat_kv(v), mask, dropout)
        else:
            masked = mask is not None and not isinstance(mask, str)
            gqa = self.n_kv_head != self.n_head and sdpa_gqa(q.device.type, q.dtype, masked)
            y = F.scaled_dot_product_attention(
                q,
                k if gqa else self._repeat_kv(k),
                v if gqa else self._repeat_kv(v),
                attn_mask=None if isinstance(mask, str) else mask,
                is_causal=mask == "causal" if isinstance(mask, str) else False,
                dropout_p=dropout,
                **({"enable_gqa": True} if gqa else {}),
            )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, S, D) -> (B, H, S, D): each key/value head repeated for the query heads that share it."""
        n = self.n_head // self.n_kv_head
        return x if n == 1 else x.repeat_interleave(n, dim=1)


def explicit_attention(q, k, v, mask, dropout: float) -> torch.Tensor:
    """softmax(q kᵀ / √D + mask) v written out, the same semantics as the SDPA call above (`mask`: "causal",
    None, or a bool (B, 1, T, S) True = attend). See `attention_kernel` for where it is used."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if isinstance(mask, str):
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(-1), p=dropout) if dropout else scores.softmax(-1)
    return weights @ v


_FLEX = None


def compiled_flex_attention():
    """flex_attention compiled once per process (uncompiled it materialises the full score matrix)."""
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def document_block_mask(documents: torch.Tensor) -> BlockMask:
    """FlexAttention's block mask for packed rows: causal within each document. `documents`: (B, T) index of
    each token's document."""

    def same_document_causal(b, h, q, kv):
        return (documents[b, q] == documents[b, kv]) & (kv <= q)

    B, T = documents.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=documents.device)


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts with an optional always-on shared expert (Qwen2-MoE layout)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = config.n_experts_per_tok, config.n_experts
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(SwiGLU(config.n_embd, config.ffn_dim) for _ in range(config.n_experts))
        self.shared_expert = None
        if config.n_shared_experts > 0:
            self.shared_expert = SwiGLU(config.n_embd, config.ffn_dim * config.n_shared_experts)
            self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C), N = B*T
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # (N, E), router in fp32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        # Switch-Transformer balance loss: E * sum_e (fraction of routed slots to e) * (mean router prob of e);
        # equals 1 for a perfectly uniform router, grows as routing concentrates.
        routed = F.one_hot(chosen, self.n_experts).float().sum(1).mean(0) / self.top_k  # (E,)
        aux = self.n_experts * (routed * probs.mean(0)).sum()
        return out.view(B, T, C), aux


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.is_moe else SwiGLU(config.n_embd, config.ffn_dim)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, layer, cache, slot=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache, slot))
        h = self.mlp(self.post_attention_layernorm(x))
        h, aux = h if isinstance(h, tuple) else (h, x.new_zeros((), dtype=torch.float32))
        return x + self.resid_dropout(h), aux


class MiniGPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("invalid model config: vocab_size must be set (it comes from the tokenizer)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        residual_std = config.init_std / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: Optional[torch.Tensor] = None,  # (B, T); default: continue after the cache
        attention_mask: Optional[torch.Tensor] = None,  # (B, S) 1 = real token, or (B, T, S) bool, True = attend
        cache: Optional[KVCache] = None,
        last_only: bool = False,  # compute logits for the last position only (decoding)
        hidden_only: bool = False,  # skip the LM head (scalar heads read `hidden`)
        document_ids: Optional[torch.Tensor] = None,  # (B, T) packed rows: attend only within the same document
    ) -> ModelOutput:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_tables(self.config.head_dim, position_ids, self.config.rope_theta)  # (B, T, D)
        if document_ids is not None and attention_mask is None and cache is None:
            dropout = self.config.dropout if self.training else 0.0
            if packed_kernel(input_ids.device.type, dropout) == "flex":
                mask = document_block_mask(document_ids)
            else:
                mask = attention_bias(document_ids[:, :, None] == document_ids[:, None, :], T, 0, input_ids.device)
        else:
            mask = attention_bias(attention_mask, T, past, input_ids.device)
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
        layers = self._compiled_layers if cache is None and self._compiled_layers is not None else self._layers
        x, aux_total = layers(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.norm(x[:, -1:] if last_only else x)
        aux_loss = self.config.aux_loss_coef * aux_total / self.config.n_layer if self.config.is_moe else aux_total
        logits = None if hidden_only else self.lm_head(x)
        return ModelOutput(logits=logits, aux_loss=aux_loss, cache=cache, hidden=x)

    def _layers(self, x, cos, sin, mask, cache, slot=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks in order; (hidden, summed MoE aux loss). With gradient checkpointing (training, no cache)
        each block keeps only its input and recomputes the rest in the backward."""
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        aux_total = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.layers):
            if recompute and cache is None:
                x, aux = checkpoint(block, x, cos, sin, mask, i, None, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, mask, i, cache, slot)
            aux_total = aux_total + aux
        return x, aux_total

    # torch.compile: `compile_layers` / `compile_decoding` record their options; the compiled callables are made on
    # first use and never travel with the module (not pickled for spawned processes, not deep-copied), so every
    # process and every copy compiles its own bound methods — never one that runs another copy's weights.

    def compile_layers(self, **options) -> None:
        """`compile=true`: the blocks of every forward without a KV cache (all training and scoring) run through
        torch.compile (`options` go to it). Parameters keep their names: checkpoints and exports are unchanged.
        Decoding compiles its own fixed-shape step (`compile_decoding`)."""
        self.__dict__["_compile_layers"] = options
        self.__dict__.get("_compiled_fns", {}).pop("_layers", None)

    def compile_decoding(self, **options) -> None:
        """Decode through a torch.compile'd `step` (with dynamic=False minillm.generate sizes every KV cache to
        block_size, so one graph serves every call of a batch size). Not for MoE models: their routing has
        data-dependent shapes (one recompile per new expert load), so their decode step stays eager."""
        if self.config.is_moe:
            return
        self.__dict__["_compile_step"] = options
        self.__dict__.get("_compiled_fns", {}).pop("step", None)

    @property
    def decoding_compiled(self) -> bool:
        return "_compile_step" in self.__dict__

    def _compiled(self, method: str, options_key: str):
        options = self.__dict__.get(options_key)
        if options is None:
            return None
        fns = self.__dict__.setdefault("_compiled_fns", {})
        if method not in fns:
            fns[method] = torch.compile(getattr(self, method), **options)
        return fns[method]

    @property
    def _compiled_layers(self):
        return self._compiled("_layers", "_compile_layers")

    @property
    def decode_step(self):
        """`step`, or its compiled form after `compile_decoding()`."""
        return self._compiled("step", "_compile_step") or self.step

    def decode_rows(self, rows: int) -> int:
        """The batch rows a decode step runs for `rows` prompts. With a compiled step: the narrowest width it has run
        that holds `rows` at most twice over (filled up: a last partial batch compiles nothing), else `rows` (one
        more graph; a chat at 1 row never runs a 64-row graph). Eagerly: `rows`."""
        if not self.decoding_compiled:
            return rows
        widths = self.__dict__.setdefault("_decode_widths", set())
        width = min((w for w in widths if rows <= w <= 2 * rows), default=rows)
        widths.add(width)
        return width

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled_fns"}

    def step(
        self,
        token: torch.Tensor,  # (B, 1)
        position: torch.Tensor,  # (B, 1) RoPE position of the new token
        cache: KVCache,
        slot: torch.Tensor,  # (1,) cache slot the new keys/values go to
        key_mask: torch.Tensor,  # (B, max_len) bool: the slots this token attends to (itself included)
    ) -> torch.Tensor:
        """One decoding step at fixed shapes, what a compiled decoder runs (no Python int changes between
        steps: the new keys/values go to `slot` and attention covers the whole preallocated cache, `key_mask`
        hiding the slots not filled and left padding). Returns the next-token logits (B, V); the caller advances
        `cache.length`."""
        cos, sin = rope_tables(self.config.head_dim, position, self.config.rope_theta)
        x = self.embed_tokens(token)
        x, _ = self._layers(x, cos, sin, key_mask[:, None, None, :], cache, slot)
        return self.lm_head(self.norm(x))[:, -1]


class RewardModel(nn.Module):
    """A MiniGPT trunk with a linear scalar head on its final hidden states: one score per position (B, T).

    A sequence's reward is the score at its last real token (as HF's LlamaForSequenceClassification reads it);
    PPO's value model is the same network read at every completion position. `lm_head` stays in the trunk
    so a reward model is initialised from, and exported like, any language model.

    With `likelihood_weight` w (a learned scalar) the reward also reads the trunk's own language model:
        r(x, y) = score(h_last) + w · (1/|y|) Σ_{t ∈ y} log p(y_t | x, y_<t)
    the mean log-likelihood of the completion's tokens, up to the one the head reads, under the trunk's LM head. A
    linear head on the last hidden state does not learn to check a sum or a reversal from a few hundred pairs;
    the SFT trunk's likelihood already prefers the right answer (docs/training.md). A mean, not a sum: it does not
    favour short replies.
    """

    def __init__(
        self,
        config: ModelConfig,
        trunk: Optional[MiniGPT] = None,
        score: Optional[nn.Linear] = None,
        likelihood_weight: Optional[nn.Parameter | float] = None,
    ):
        super().__init__()
        self.config = config
        self.model = trunk if trunk is not None else MiniGPT(config)
        self.score = score if score is not None else nn.Linear(config.n_embd, 1, bias=False)
        if score is None:
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(config.n_embd + 1))
        if likelihood_weight is None or isinstance(likelihood_weight, nn.Parameter):
            self.likelihood_weight = likelihood_weight  # a training module's own parameter is shared, not copied
        else:
            self.likelihood_weight = nn.Parameter(torch.tensor(float(likelihood_weight)))

    @classmethod
    def from_trunk(
        cls, trunk: MiniGPT, score_weight: torch.Tensor, likelihood_weight: Optional[float] = None
    ) -> RewardModel:
        """A trained reward model from its trunk, its head's weight (1, n_embd) and its likelihood weight (None:
        the head alone), as files store them."""
        head = nn.Linear(trunk.config.n_embd, 1, bias=False)
        with torch.no_grad():
            head.weight.copy_(score_weight)
        return cls(trunk.config, trunk=trunk, score=head, likelihood_weight=likelihood_weight)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: Optional[torch.Tensor] = None,  # (B, T) 1 = real token
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.scores_and_aux(input_ids, attention_mask, position_ids)[0]  # (B, T)

    def scores_and_aux(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, T), the trunk's MoE load-balancing loss): a trained head adds the loss as pretraining does."""
        out = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask, hidden_only=True)
        return self.score(out.hidden).squeeze(-1).float(), out.aux_loss

    def sequence_scores(
        self,
        input_ids: torch.Tensor,  # (B, T), right-padded or not
        last: torch.Tensor,  # (B,) index of each sequence's last real token
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        return_aux: bool = False,
        first: Optional[torch.Tensor] = None,  # (B,) index of each completion's first token
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reward of each sequence: the score at its last real token, (B,) (and the MoE load-balancing loss
        with `return_aux`), plus the likelihood term when the model has one (it needs `first`). Causal attention:
        padding after that token is never seen. The one place a sequence is scored (training, RLHF, evaluation)."""
        out = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask, hidden_only=True)
        scores = self.score(out.hidden).squeeze(-1).float().gather(1, last[:, None]).squeeze(1)
        if self.likelihood_weight is not None:
            if first is None:
                raise ValueError(
                    "this reward model reads the completion's likelihood: pass `first`, each completion's first index"
                )
            scores = scores + self.likelihood_weight.float() * self.completion_likelihood(
                out.hidden, input_ids, first, last
            )
        return (scores, out.aux_loss) if return_aux else scores

    def completion_likelihood(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, first: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """Mean log p(token t | tokens < t) over t in [first, last] of each row, (B,) in fp32 (0 for an empty
        range). `hidden` (B, T, C) is the trunk's final hidden state; position t - 1 predicts token t."""
        t = torch.arange(1, input_ids.shape[1], device=input_ids.device)
        inside = (t >= first[:, None]) & (t <= last[:, None])  # (B, T-1): token t is the completion's
        logits = self.model.lm_head(hidden[:, :-1][inside]).float()  # (N, V): those positions only
        logp = torch.log_softmax(logits, -1).gather(1, input_ids[:, 1:][inside][:, None]).squeeze(1)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(inside)[inside]
        total = torch.zeros(len(input_ids), device=input_ids.device).index_add(0, rows, logp)
        return total / inside.sum(1).clamp(min=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, T) 0/1 mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).amax(1)


def first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first 1 in each row of a (B, T) 0/1 mask (T for an empty row)."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, T).amin(1)


def attention_bias(attention_mask: Optional[torch.Tensor], T: int, past: int, device) -> torch.Tensor | str | None:
    """The mask SDPA gets: "causal" (fast path), None (one new token, nothing masked) or a (B, 1, T, S) bool.

    A 2-D mask marks real tokens (left padding = 0); a 3-D mask is taken as given (packed documents) and made
    causal. Every query may attend to itself, so rows of padding never become all -inf (NaN).
    """
    if attention_mask is None:
        if past == 0:
            return "causal"
        if T == 1:
            return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None]  # (1, T, S)
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape[1] != S:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; cache + input is {S}")
            allowed = allowed & attention_mask.bool()[:, None, :]
        else:
            allowed = allowed & attention_mask.bool()
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]  # (B, 1, T, S)


def document_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index of each token of packed rows whose positions restart at 0 at each new document
    (what `forward(document_ids=...)` takes)."""
    return (position_ids == 0).cumsum(dim=1)
