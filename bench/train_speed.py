"""Training speed: ours against sparsify and SAELens on the same activations, and against the matmul peak.

    python bench/train_speed.py                          # SmolLM2-135M block 15, 4608 latents, k 32
    python bench/train_speed.py --steps 100 --quality-tokens 0 --threads 1
    python bench/train_speed.py --device cuda --peers none --batch-size 4096 --expansion 32 --steps 500

All trainers run in this one process, one after another, with the same threads, on the same shuffled
batches of the same cached activations (`bench/activations.py`), at the same width, k and batch size, each
with its own default recipe (`bench/peers.py`; peers where installed: `pip install -e .[bench]`), and all
with the allocator setting our training applies on the CPU (`sae.train.keep_freed_memory`). Prints:
- the measured peak of a matmul of the encoder's shape, [batch, D] @ [D, F], in fp32 and bf16;
- training tokens/s of each trainer over `--steps` steps, and ours / each peer;
- our achieved fraction of that peak: tokens/s x 2*D*F (the encoder product every token needs; all else
  our kernels do is O(K*D) per token) over the peak FLOP/s of our precision;
- on a GPU, our fraction of its dense bf16 peak from the data sheet (`bench/gpu.py`), counting what a TopK
  training step computes per token: 2*D*F for the dense encoder product, 8*K*D for the sparse rest (decoder
  forward, decoder weight and code gradients, encoder weight gradient; AuxK's D/2 extra latents while any are
  dead are not counted). A dense SAE would cost 6*D*F;
- quality of mixed precision: held-out FVU of ours trained in bf16 and in fp32 for `--quality-tokens`
  (the bar: bf16 no worse than fp32 by more than 1%).
Absolute figures on shared machines are noise; the ratios, measured in the same run, are the result.

`--device cuda` trains ours on the GPU from activations held in its memory (so the host's batch gathering is
not timed), after an untimed warm-up run (CUDA context, cuBLAS handles, kernel selection); peers still train
where their own code puts them, from host memory.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import activations as acts_file  # noqa: E402  (bench/activations.py)
import gpu  # noqa: E402  (bench/gpu.py)
import quality  # noqa: E402  (bench/quality.py)

from sae.config import DataConfig, ModelConfig  # noqa: E402
from sae.devices import resolve_dtype  # noqa: E402
from sae.train import keep_freed_memory  # noqa: E402


def matmul_peak(
    B: int, D: int, F: int, dtype: torch.dtype, seconds: float = 2.0, device: torch.device | str = "cpu"
) -> float:
    """FLOP/s of [B, D] @ [D, F] in `dtype` on `device`, the best of repeated timings over about `seconds`.
    On a GPU each timing covers 20 products queued back to back, so the wait for the device is not counted
    once per product."""
    a, b = torch.randn(B, D).to(device, dtype), torch.randn(D, F).to(device, dtype)
    reps = 20 if torch.device(device).type == "cuda" else 1
    a @ b  # warm-up
    gpu.synchronize(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        gpu.synchronize(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * B * D * F / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=ModelConfig().name, help="model.name of the activations")
    parser.add_argument("--layer", type=int, default=ModelConfig().layer)
    parser.add_argument("--train-tokens", type=int, default=600_000, help="harvested training activations")
    parser.add_argument("--test-tokens", type=int, default=65_536, help="harvested held-out activations")
    parser.add_argument(
        "--device",
        help="where ours trains and the matmul peak is measured, and the activations are harvested if not "
        "cached: cpu, cuda, cuda:1 (default: train on cpu, harvest where model.device=auto puts the model)",
    )
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
    device = torch.device(args.device or "cpu")

    model_cfg = ModelConfig(name=args.model, layer=args.layer, device=args.device or "auto")
    x_train, x_test = acts_file.load(
        acts_file.activation_file(model_cfg, DataConfig(), args.train_tokens, args.test_tokens)
    )
    D = x_train.shape[1]
    F, B = args.expansion * D, args.batch_size
    tokens = args.steps * B
    ours_x, ours_test = x_train.to(device), x_test.to(device)
    ours_dtype = resolve_dtype("auto", device)
    peak = {dt: matmul_peak(B, D, F, dt, device=device) for dt in (torch.float32, torch.bfloat16)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(
        f"{len(x_train):,} activations of width {D}; d_sae {F}, k {args.k}, batch {B}, {args.steps} steps, "
        f"ours on {device} ({where})"
    )
    for dt, flops in peak.items():
        print(
            f"matmul peak [{B}, {D}] @ [{D}, {F}], {str(dt).removeprefix('torch.')}: {flops / 1e9:.1f} GFLOP/s"
        )

    if device.type == "cuda":
        quality.ours("topk", ours_x, F, args.k, 20 * B, B, args.seed, device=device)  # the warm-up
    speed: dict[str, float] = {}
    loop: dict[str, float] = {}  # the training loop's own clock, from its first log step to its last
    for precision in ("auto", "float32"):
        logged: dict = {}
        _, seconds = quality.ours(
            "topk",
            ours_x,
            F,
            args.k,
            tokens,
            B,
            args.seed,
            device=device,
            log=lambda m, s, logged=logged: logged.update(m),
            precision=precision,
        )
        name = f"ours ({precision}: {str(resolve_dtype(precision, device)).removeprefix('torch.')})"
        speed[name], loop[name] = tokens / seconds, logged["train/tokens_per_second"]
        print(
            f"{name}: {speed[name]:,.0f} tok/s ({loop[name]:,.0f} in the loop after the first step, set-up "
            "excluded)",
            flush=True,
        )
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
    step_flops = loop[ours_name] * (2 * D * F + 8 * args.k * D)
    print(
        f"ours in the loop: {step_flops / 1e12:.4g} TFLOP/s at 2*D*F + 8*K*D FLOPs per token = "
        f"{gpu.peak_fraction(step_flops, device, ours_dtype)}"
    )

    if args.quality_tokens:
        fvus = {}
        for precision in ("bfloat16", "float32"):
            reconstruct, _ = quality.ours(
                "topk",
                ours_x,
                F,
                args.k,
                args.quality_tokens,
                B,
                args.seed,
                device=device,
                precision=precision,
            )
            fvus[precision] = quality.held_out(reconstruct, ours_test, F)["fvu"]
        change = fvus["bfloat16"] / fvus["float32"] - 1
        print(
            f"\nheld-out FVU after {args.quality_tokens:,} tokens: bf16 {fvus['bfloat16']:.4f}, "
            f"fp32 {fvus['float32']:.4f} ({change:+.2%} for bf16; bar: at most +1%)"
        )


if __name__ == "__main__":
    main()
