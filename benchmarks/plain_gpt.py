"""Training speed against a plain GPT: MiniGPT beside a nanoGPT-style GPT of the same width, depth, heads,
vocabulary, context and batch, in the same bare loop (forward, fp32 cross-entropy, backward, clip, AdamW),
alternated round by round in one process so both see the same machine.

    python -m benchmarks.plain_gpt [--preset tiny] [--precisions 32-true bf16-mixed] [--compile off on]
        [--rounds 3] [--steps 6] [--batch 16]

The plain GPT is the architecture nanoGPT trains (GPT-2's): learned position embeddings, LayerNorm, one fused
q/k/v projection, causal SDPA, a GELU MLP four times as wide, a tied head, no biases. MiniGPT is the Llama layout
(RMSNorm, RoPE, grouped K/V, SwiGLU). Their FLOPs per token differ a little, so the table shows both tokens/s and
MFU (each model's own 6 × matmul parameters + 6 × layers × T × C against the matmul peak measured in the same
run). "compile on": MiniGPT through its own `compile_layers` (what `compile=true` does), the plain GPT through
`torch.compile(model)` (what nanoGPT does). Each cell is the best of `--rounds` rounds of `--steps` steps.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import print_table, write
from minillm.accelerator import cpu_has_fast_bf16
from minillm.config import compose
from minillm.flops import flops_per_token, measure_peak
from minillm.model import MiniGPT, ModelConfig


class PlainBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)  # q, k and v in one matmul
        self.c_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, context: int, layers: int, width: int, heads: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(PlainBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def flops_per_token(self, context: int) -> float:
        """6 × matmul parameters (the head counted, the embeddings not) + 6 × layers × T × C, as minillm.flops."""
        width, layers = self.wpe.weight.shape[1], len(self.blocks)
        matmul = layers * 12 * width * width + self.wte.weight.numel()
        return 6 * matmul + 6 * layers * context * width


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW as every minillm stage builds it: weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))


def train_step(forward, model, opt, x, y, autocast) -> None:
    with autocast:
        logits = forward(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def preset(name: str) -> ModelConfig:
    """The model preset `model=<name>` composes, with the built-in tokenizer's vocabulary size (8192)."""
    cfg = compose([f"model={name}"])
    fields = {k: v for k, v in dict(cfg.model).items() if k in ModelConfig.__dataclass_fields__ and k != "lora"}
    return ModelConfig(**(fields | {"vocab_size": fields.get("vocab_size") or int(cfg.tokenizer.vocab_size)}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the first round (compiles)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    if "bf16-mixed" in args.precisions and not cpu_has_fast_bf16():
        args.precisions = [p for p in args.precisions if p != "bf16-mixed"]
        print("this CPU has no native bf16 (AVX512_BF16 or AMX): bf16-mixed left out (training would run fp32)")
    config = preset(args.preset)
    T, V = config.block_size, config.vocab_size
    peaks = {
        p: measure_peak(torch.bfloat16 if p == "bf16-mixed" else torch.float32, args.peak_size) for p in args.precisions
    }
    print("measured matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (args.batch, T + 1), generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]
    rows = []
    for precision in args.precisions:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        for compiled in args.compile:
            torch.manual_seed(0)
            ours = MiniGPT(config).train()
            plain = PlainGPT(V, T, config.n_layer, config.n_embd, config.n_head).train()
            forwards = {"minillm": lambda ids, m=ours: m(ids).logits, "plain GPT": plain}
            if compiled == "on":
                ours.compile_layers()
                forwards["plain GPT"] = torch.compile(plain)
            models = {"minillm": ours, "plain GPT": plain}
            opts = {name: optimizer(m) for name, m in models.items()}
            for name, model in models.items():
                for _ in range(args.warmup):
                    train_step(forwards[name], model, opts[name], x, y, autocast)
            best = {name: 0.0 for name in models}
            for _ in range(args.rounds):  # alternated: a slow spell of the machine hits both
                for name, model in models.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        train_step(forwards[name], model, opts[name], x, y, autocast)
                    best[name] = max(best[name], args.steps * x.numel() / (time.perf_counter() - start))
            flops = {"minillm": flops_per_token(config, T), "plain GPT": plain.flops_per_token(T)}
            for name in models:
                rows.append(
                    {
                        "precision": precision,
                        "compile": compiled,
                        "model": name,
                        "params": sum(p.numel() for p in models[name].parameters()),
                        "tok/s": best[name],
                        "MFU": flops[name] * best[name] / peaks[precision],
                        "vs plain": best[name] / best["plain GPT"],
                    }
                )
            print_table(rows[-2:], list(rows[-1]))
    print()
    columns = list(rows[-1]) if rows else []
    print_table(rows, columns)
    payload = {"preset": args.preset, "batch": args.batch, "context": T, "peaks": peaks, "rows": rows}
    write("plain_gpt", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
