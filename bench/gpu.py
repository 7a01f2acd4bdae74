"""The machine a benchmark runs on: what `bench/gpu.sh` reports first, and the GPUs' bf16 peaks.

    python bench/gpu.py                          # the machine as Markdown: GPUs, memory, torch, CUDA, commit
    python bench/gpu.py --count-file runs/gpus   # ... and the number of CUDA devices written to that file

`bench/harvest.py` and `bench/train_speed.py` import `synchronize` (CUDA runs kernels asynchronously: a timer
read before the device is done measures the launch, not the work) and `peak_fraction`.
"""

import argparse
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense (no structured sparsity) bf16 tensor-core peaks from the vendor's data sheets, in TFLOP/s: (words the
# name from torch.cuda.get_device_name() contains, words it must not contain, peak). The PCIe and NVL
# variants of H100 and H200 run at lower clocks and are left out rather than given the SXM figure.
BF16_PEAKS = (
    (("H100",), ("PCIE", "NVL"), 989.0),  # H100 SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), ("NVL",), 989.0),
    (("A100",), (), 312.0),
    (("L40S",), (), 362.0),
    (("RTX 4090",), (), 165.0),
)


def bf16_peak(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name`, in FLOP/s, or None where the table does not know it."""
    upper = name.upper()
    for needed, excluded, tflops in BF16_PEAKS:
        if all(w in upper for w in needed) and not any(w in upper for w in excluded):
            return tflops * 1e12
    return None


def synchronize(device: torch.device | str) -> None:
    """Waits for the kernels queued on `device` (a CUDA one); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_fraction(flops_per_second: float, device: torch.device | str, dtype: torch.dtype) -> str:
    """`flops_per_second` as a fraction of `device`'s dense bf16 peak, e.g. "0.41 of the NVIDIA H200's 989
    TFLOP/s bf16 dense peak", or why there is none to compare with ("n/a: ...")."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"n/a: no peak table for {device.type}"
    name = torch.cuda.get_device_name(device)
    if dtype != torch.bfloat16:
        return f"n/a: computed in {str(dtype).removeprefix('torch.')}, the table holds bf16 peaks"
    peak = bf16_peak(name)
    if peak is None:
        return f"n/a: no bf16 peak known for {name}"
    return f"{flops_per_second / peak:.3f} of the {name}'s {peak / 1e12:.0f} TFLOP/s bf16 dense peak"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "n/a (no nvidia-smi)"
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "n/a"


def machine() -> list[str]:
    """The Markdown rows describing this machine: GPUs, memory, versions, the commit checked."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "n/a (not a git checkout)"
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    rows = [("CPU", f"{_cpu_model()}, {_cpus()} cores available")]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        memory = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(n)]
        same = len(set(names)) == 1 and len({round(m) for m in memory}) == 1
        if same:
            gpus = f"{n} x {names[0]}, {memory[0]:.1f} GiB each"
        else:
            gpus = "; ".join(f"cuda:{i} {nm} {m:.1f} GiB" for i, (nm, m) in enumerate(zip(names, memory)))
        peak = bf16_peak(names[0])
        rows += [
            ("GPUs", gpus),
            ("bf16 dense peak", f"{peak / 1e12:.0f} TFLOP/s per GPU" if peak else f"n/a for {names[0]}"),
            ("bf16 supported", str(torch.cuda.is_bf16_supported())),
            ("driver", _driver()),
            ("CUDA (torch built for)", str(torch.version.cuda)),
            ("cuDNN", str(torch.backends.cudnn.version())),
            ("NCCL", ".".join(map(str, torch.cuda.nccl.version())) if n else "n/a"),
        ]
    else:
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        rows.append(("GPUs", f"none: CUDA is not available to torch ({built})"))
    rows += [("torch", torch.__version__), ("python", platform.python_version()), ("git commit", commit)]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count-file", type=Path, help="also write the number of CUDA devices to this file")
    args = parser.parse_args()
    print("\n".join(machine()))
    if args.count_file:
        args.count_file.write_text(f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}\n")
