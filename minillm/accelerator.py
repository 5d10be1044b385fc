"""Which accelerator and precision this machine runs minillm with: the library side of `minillm device`, used by
training (precision), decoding (`device="auto"`) and the benchmarks. torch is imported inside each function."""

from __future__ import annotations

import platform


def best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    """Whether torch multiplies bf16 matrices on this CPU faster than fp32. On x86 that takes native bf16
    instructions (AVX512_BF16: Zen 4, Cooper Lake, Sapphire Rapids; or AMX): measured 869 GFLOP/s bf16 against
    211 fp32 on a Zen 4 EPYC. AVX-512 alone is not enough: an Intel Xeon with AVX-512 but no AVX512_BF16
    measured 63 GFLOP/s bf16 against 347 fp32, and an AVX2-only EPYC 1.0 against 18.9 (`make demo`'s bf16
    pretraining ran at 62 tokens/s instead of thousands)."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # not measured here: the user's setting stands
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def training_precision(precision: str, accelerator: str) -> tuple[str, str | None]:
    """The precision to train with and, when it differs from the one asked for, why: bf16 on a CPU without a fast
    bf16 kernel trains in fp32 instead (same results up to rounding, many times faster)."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and best_device() == "cpu")
    if precision == "auto":  # the default: bf16-mixed where a GPU computes in bf16, fp32 on CPUs and older GPUs
        import torch

        on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and best_device() == "cuda")
        return ("bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"), None
    if on_cpu and str(precision).startswith("bf16") and not cpu_has_fast_bf16():
        return "32-true", (
            f"trainer.precision={precision} on this CPU (no AVX512_BF16 or AMX) would run bf16 matrix products "
            "without native instructions, 5-20x slower than fp32: training in 32-true instead"
        )
    return str(precision), None
