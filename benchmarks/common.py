"""Shared by the benchmarks: the machine, a measured matmul peak and memory bandwidth, FLOPs per token, tables
and JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from minillm.flops import flops_per_token, matmul_params, measure_peak  # noqa: F401 (re-exported)

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


def measure_bandwidth(megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-`repeats` memory read bandwidth in bytes/s: the sum of a buffer much larger than any cache (what a
    batch-1 decoder does with its weights every token)."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    x.sum()  # warm-up (and first touch)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


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
