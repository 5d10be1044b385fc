"""Model FLOPs and the device's matmul peak: what MFU (model FLOPs utilisation) is computed from, in training
logs (`train/mfu`) and in benchmarks/."""

from __future__ import annotations

import time

import torch

from minillm.model import ModelConfig

_PEAKS: dict[tuple[str, torch.dtype], float] = {}


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


def measure_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Best-of-`repeats` FLOP/s of an n×n matmul in `dtype` on `device`: the peak MFU is measured against."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(0)  # its own: measuring never moves a run's random stream
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# Dense bf16 tensor-core peaks from the vendors' spec sheets (FLOP/s, no sparsity), each under the words that name
# the GPU in torch.cuda.get_device_name() (first match wins): what MFU is reported against on these GPUs, as other
# trainers report it.
GPU_BF16_PEAKS = (
    (("H100", "PCIe"), 756e12),
    (("H100",), 989.4e12),
    (("H200",), 989.4e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("RTX", "4090"), 165.2e12),
    (("RTX", "3090"), 71e12),
)


def spec_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """The spec-sheet bf16 peak of a GPU named `device_name`, or None (another GPU, another dtype)."""
    if dtype != torch.bfloat16:
        return None
    words = set(device_name.replace("-", " ").split())
    return next((peak for names, peak in GPU_BF16_PEAKS if words.issuperset(names)), None)


def device_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul peak MFU is reported against: on a GPU in the table above, its spec-sheet bf16 peak; elsewhere
    measured once per process (a 512² matmul on a CPU, 8192² on a GPU, whose peak smaller ones do not reach) —
    a shared CPU's peak moves between runs (131-211 GFLOP/s fp32 on the same 2 cores)."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        spec = spec_peak(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
        n = 8192 if device.type == "cuda" else 512
        _PEAKS[key] = spec or measure_peak(dtype, n=n, repeats=3, device=device)
    return _PEAKS[key]


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting ("bf16-mixed" -> bf16, "32-true" -> fp32)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
