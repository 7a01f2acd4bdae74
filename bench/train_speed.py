"""Training speed: ours against sparsify and SAELens on the same activations, and against the matmul peak.

    python bench/train_speed.py                          # SmolLM2-135M block 15, 4608 latents, k 32
    python bench/train_speed.py --steps 100 --quality-tokens 0 --threads 1

All trainers run in this one process, one after another, with the same threads, on the same shuffled
batches of the same cached activations (`bench/activations.py`), at the same width, k and batch size, each
with its own default recipe (`bench/peers.py`; peers where installed: `pip install -e .[bench]`), and all
with the allocator setting our training applies on the CPU (`sae.train.keep_freed_memory`). Prints:
- the measured peak of a matmul of the encoder's shape, [batch, D] @ [D, F], in fp32 and bf16;
- training tokens/s of each trainer over `--steps` steps, and ours / each peer;
- our achieved fraction of that peak: tokens/s x 2*D*F (the encoder product every token needs; all else
  our kernels do is O(K*D) per token) over the peak FLOP/s of our precision;
- quality of mixed precision: held-out FVU of ours trained in bf16 and in fp32 for `--quality-tokens`
  (the bar: bf16 no worse than fp32 by more than 1%).
Absolute figures on shared machines are noise; the ratios, measured in the same run, are the result.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import activations as acts_file  # noqa: E402  (bench/activations.py)
import quality  # noqa: E402  (bench/quality.py)

from sae.config import DataConfig, ModelConfig  # noqa: E402
from sae.devices import resolve_dtype  # noqa: E402
from sae.train import keep_freed_memory  # noqa: E402


def matmul_peak(B: int, D: int, F: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of [B, D] @ [D, F] in `dtype`, the best of repeated timings over about `seconds`."""
    a, b = torch.randn(B, D).to(dtype), torch.randn(D, F).to(dtype)
    a @ b  # warm-up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * B * D * F / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=ModelConfig().layer)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200, help="steps each trainer is timed over")
    parser.add_argument(
        "--quality-tokens",
        type=int,
        default=2_500_000,
        help="tokens for the bf16 vs fp32 quality check (0: skip)",
    )
    parser.add_argument("--peers", default="sparsify,sae-lens", help="peers to time where installed, or none")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, for all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # what our train() does on the CPU, here for every trainer alike

    x_train, x_test = acts_file.load(
        acts_file.activation_file(ModelConfig(layer=args.layer), DataConfig(), 600_000, 65_536)
    )
    D = x_train.shape[1]
    F, B = args.expansion * D, args.batch_size
    tokens = args.steps * B
    ours_dtype = resolve_dtype("auto", torch.device("cpu"))
    peak = {dt: matmul_peak(B, D, F, dt) for dt in (torch.float32, torch.bfloat16)}
    print(
        f"{len(x_train):,} activations of width {D}; d_sae {F}, k {args.k}, batch {B}, {args.steps} steps, "
        f"{args.threads} threads"
    )
    for dt, flops in peak.items():
        print(
            f"matmul peak [{B}, {D}] @ [{D}, {F}], {str(dt).removeprefix('torch.')}: {flops / 1e9:.1f} GFLOP/s"
        )

    speed: dict[str, float] = {}
    for precision in ("auto", "float32"):
        _, seconds = quality.ours("topk", x_train, F, args.k, tokens, B, args.seed, precision=precision)
        name = (
            f"ours ({precision}: {str(resolve_dtype(precision, torch.device('cpu'))).removeprefix('torch.')})"
        )
        speed[name] = tokens / seconds
        print(f"{name}: {speed[name]:,.0f} tok/s", flush=True)
    import peers  # bench/peers.py

    for label, fit in peers.installed_trainers(args.peers).items():
        torch.manual_seed(args.seed)
        trained = fit(x_train, F, args.k, tokens, B, args.seed)
        speed[label] = tokens / trained.train_seconds
        print(f"{label}: {speed[label]:,.0f} tok/s", flush=True)

    ours_name = next(iter(speed))
    print("\n| trainer | tokens/s | ours / this |")
    print("|---|---|---|")
    for name, tps in speed.items():
        print(f"| {name} | {tps:,.0f} | {speed[ours_name] / tps:.2f} |")
    achieved = speed[ours_name] * 2 * D * F
    print(
        f"\nours: {achieved / 1e9:.1f} GFLOP/s in the encoder product = {achieved / peak[ours_dtype]:.2f} of the "
        f"{str(ours_dtype).removeprefix('torch.')} matmul peak"
    )

    if args.quality_tokens:
        fvus = {}
        for precision in ("bfloat16", "float32"):
            reconstruct, _ = quality.ours(
                "topk", x_train, F, args.k, args.quality_tokens, B, args.seed, precision=precision
            )
            fvus[precision] = quality.held_out(reconstruct, x_test, F)["fvu"]
        change = fvus["bfloat16"] / fvus["float32"] - 1
        print(
            f"\nheld-out FVU after {args.quality_tokens:,} tokens: bf16 {fvus['bfloat16']:.4f}, "
            f"fp32 {fvus['float32']:.4f} ({change:+.2%} for bf16; bar: at most +1%)"
        )


if __name__ == "__main__":
    main()
