"""Shared by the benchmarks: the machine, a measured matmul peak, FLOPs per token, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from minillm.model import ModelConfig

OUT_DIR = Path("outputs/bench")


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-`repeats` FLOP/s of an n×n matmul in `dtype`: the peak MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token: attention and MLP projections of every layer (the active
    experts of an MoE) and the LM head (counted even when tied: it is a matmul). Embedding lookups are not."""
    C, H, K, D = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
    attention = C * H * D + 2 * C * K * D + H * D * C
    experts = (config.n_experts_per_tok + config.n_shared_experts) if config.is_moe else 1
    mlp = 3 * C * config.ffn_dim * experts
    return config.n_layer * (attention + mlp) + config.vocab_size * C


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 × matmul parameters + 6 × layers × sequence × width
    (the attention scores and the weighted sum, causal half, PaLM's accounting)."""
    return 6 * matmul_params(config) + 6 * config.n_layer * seq_len * config.n_embd


def median_rate(times: list[float], units: float) -> float:
    """units / median(step time)."""
    return units / statistics.median(times) if times else 0.0


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "–" if v is None else str(v)


def write(name: str, payload: dict, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"wrote {path}")
    return path
