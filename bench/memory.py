"""Steady memory: resident memory of a long CPU training run, sampled as it goes.

    python bench/memory.py                      # 3000 steps on the cached SmolLM2 block-15 activations
    python bench/memory.py --steps 10000 --every 500

Trains our TopK SAE (4608 latents, k 32, batches of 1024) on the activations `bench/activations.py` caches,
streaming them pass after pass as the pipeline does (shuffled passes made in the background prefetch thread,
a checkpoint with the stream's position every `--checkpoint-every` steps), and reads this process's resident
set size (/proc/self/statm) every `--every` steps through the training loop's logger. Prints the samples and
the growth from the end of the warm-up (the first 10% of steps) to the end: a steady run grows by no more
than noise.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import activations as acts_file  # noqa: E402  (bench/activations.py)

from sae import (
    stream,  # noqa: E402
)
from sae.config import DataConfig, ModelConfig, SAEConfig, TrainConfig  # noqa: E402
from sae.train import train  # noqa: E402


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250, help="steps between samples")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--checkpoint-every", type=int, default=250, help="steps between checkpoints (0: none)"
    )
    args = parser.parse_args()

    x_train, _ = acts_file.load(acts_file.activation_file(ModelConfig(), DataConfig(), 600_000, 65_536))
    tokens = args.steps * args.batch_size
    cfg = TrainConfig(
        tokens=tokens,
        batch_size=args.batch_size,
        log_every=args.every,
        eval_every=0,
        checkpoint_every=args.checkpoint_every,
    )
    samples: list[tuple[int, float]] = []
    start = time.perf_counter()
    batches = stream.prefetch(
        stream.epochs(x_train, args.batch_size, tokens, torch.Generator().manual_seed(0))
    )
    with tempfile.TemporaryDirectory() as checkpoints:
        train(
            SAEConfig(),
            cfg,
            batches,
            log=lambda metrics, step: samples.append((step, rss_mib())),
            checkpoint_dir=Path(checkpoints) / "checkpoint" if args.checkpoint_every else None,
        )
    batches.close()
    print(f"{args.steps} steps of {args.batch_size} in {time.perf_counter() - start:.0f} s; resident memory:")
    for step, rss in samples:
        print(f"  step {step:6d}: {rss:8.1f} MiB")
    warm_step, warm = next((step, rss) for step, rss in samples if step >= args.steps // 10)
    print(
        f"growth after warm-up (step {warm_step} -> {samples[-1][0]}): {samples[-1][1] - warm:+.1f} MiB "
        f"({(samples[-1][1] - warm) / warm:+.2%})"
    )


if __name__ == "__main__":
    main()
