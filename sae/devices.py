"""The machine a run uses: its device, the dtype its matmuls run fastest in, and peak memory."""

import resource
import sys
from pathlib import Path

import torch


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where the hardware runs bf16 matmuls natively, else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def peak_memory() -> dict[str, float]:
    """Peak memory of this process so far, in GiB: host RSS, and CUDA memory where CUDA was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_gb": round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}
    if torch.cuda.is_initialized():
        peak["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peak
