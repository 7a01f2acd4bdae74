"""The machine a run uses: its device, the dtype its matmuls run fastest in, peak memory, and the
data-parallel process group."""

import datetime
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist


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


def distributed(batch_size: int | None, device: str) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes in the environment (NCCL when the
    model runs on CUDA, each rank on its own GPU; gloo on the CPU), or (0, 1) without torchrun.
    `batch_size` is the global batch (`train.batch_size`), checked to divide among the processes (None: no
    batch to divide, as in an analysis)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if batch_size is not None and batch_size % world:
        raise ValueError(
            f"train.batch_size={batch_size} is the global batch and must divide evenly among the "
            f"{world} data-parallel processes; use a multiple of {world}"
        )
    if not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks other than 0 wait in a collective while rank 0 alone evaluates and analyses an SAE of a `saes`
        # list; the default timeout (10 min for NCCL) is shorter than that can take.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), world
