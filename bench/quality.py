"""SAE quality at equal width, k and token budget: ours against SAELens and sparsify, on the same activations.

    python bench/quality.py                                   # TopK, SmolLM2-135M block 15, 2.5M tokens
    python bench/quality.py --archs topk,batchtopk,matryoshka,jumprelu,relu --peers none
    python bench/quality.py --tokens 600000 --k 64

Harvests once (`bench/activations.py`: 600k training and 65k held-out tokens, cached), then trains our SAE
and, where installed (`pip install -e .[bench]`), SAELens' and sparsify's TopK SAEs, each with its own
default recipe (`bench/peers.py`), on the very same activations, drawn in the same shuffled order of the
same training tokens. Every SAE is scored by the same code on the held-out tokens: FVU (centered),
explained variance (uncentered), L0, dead fraction (latents that never fire on the held-out tokens), and
the language model's loss with the SAE spliced in (delta CE, KL, fraction recovered against zero ablation).
Prints one table and the FVU ratios against ours.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import activations as acts_file  # noqa: E402  (bench/activations.py)

from sae import (
    harvest,  # noqa: E402
    stream,  # noqa: E402
)
from sae.config import DataConfig, ModelConfig, SAEConfig, TrainConfig  # noqa: E402
from sae.evaluate import loss_recovered  # noqa: E402
from sae.train import train  # noqa: E402

Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x [B, D] -> (x_hat, z [B, F])


def batches(x: torch.Tensor, batch_size: int, tokens: int, seed: int):
    """Shuffled [batch_size, D] batches of x, pass after pass, until `tokens` (the same for every trainer)."""
    return stream.epochs(x, batch_size, tokens, torch.Generator().manual_seed(seed))


@torch.no_grad()
def held_out(reconstruct: Reconstruct, x: torch.Tensor, d_sae: int) -> dict:
    """FVU, uncentered explained variance, L0 and dead fraction of `reconstruct` on held-out x [B, D]."""
    sq_err = l0 = 0.0
    fired = torch.zeros(d_sae, dtype=torch.bool)
    for chunk in x.split(4096):
        x_hat, z = reconstruct(chunk)
        sq_err += (chunk - x_hat).double().pow(2).sum().item()
        l0 += (z > 0).sum().item()
        fired |= (z > 0).any(dim=0).cpu()
    centered = (x.double() - x.double().mean(dim=0)).pow(2).sum().item()
    return {
        "fvu": sq_err / centered,
        "explained_variance": 1 - sq_err / x.double().pow(2).sum().item(),
        "l0": l0 / len(x),
        "dead_fraction": 1 - fired.float().mean().item(),
    }


def ours(
    arch: str,
    x: torch.Tensor,
    d_sae: int,
    k: int,
    tokens: int,
    batch_size: int,
    seed: int,
    device: str | torch.device = "cpu",
    log: Callable[[dict, int], None] | None = None,
    **train_kw,
):
    """Trains our SAE on x on `device`; returns (reconstruct, training seconds). `log` receives the metrics
    of the first and the last step; `train_kw`: further TrainConfig fields. `reconstruct` takes and returns
    tensors on the caller's device, whatever `device` is."""
    d_in = x.shape[1]
    sae_cfg = SAEConfig(arch=arch, expansion_factor=d_sae // d_in, k=k)
    cfg = TrainConfig(
        tokens=tokens, batch_size=batch_size, seed=seed, log_every=10**9, eval_every=0, **train_kw
    )
    start = time.perf_counter()
    sae = train(
        sae_cfg, cfg, batches(x, batch_size, tokens, seed), log=log or (lambda m, s: None), device=device
    )
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: the clock stops when they are done
    seconds = time.perf_counter() - start

    def reconstruct(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = sae.encode(chunk.to(device))
        return sae.decode(code).to(chunk.device), sae.dense(code).to(chunk.device)

    return reconstruct, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=ModelConfig().layer)
    parser.add_argument("--tokens", type=int, default=2_500_000, help="training tokens for every SAE")
    parser.add_argument(
        "--train-tokens", type=int, default=600_000, help="distinct harvested training tokens"
    )
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--archs", default="topk", help="our architectures, comma-separated")
    parser.add_argument(
        "--peers", default="sae-lens,sparsify", help="peers to train where installed, or none"
    )
    parser.add_argument(
        "--loss-contexts", type=int, default=64, help="held-out contexts for the spliced loss"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, for all")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg, data = ModelConfig(layer=args.layer), DataConfig()
    x_train, x_test = acts_file.load(acts_file.activation_file(model_cfg, data, args.train_tokens, 65_536))
    d_in = x_train.shape[1]
    d_sae = args.expansion * d_in
    model, tokenizer = harvest.load_model(model_cfg)
    module = harvest.resolve_module(model, model_cfg)
    print(
        f"{model_cfg.name} {module}: {len(x_train):,} training tokens (d_in {d_in}), {len(x_test):,} held out; "
        f"d_sae {d_sae}, k {args.k}, {args.tokens:,} training tokens per SAE"
    )

    trainers: dict[str, Callable[[], tuple[Reconstruct, float]]] = {}
    for arch in args.archs.split(","):
        trainers[f"ours {arch}"] = lambda arch=arch: ours(
            arch, x_train, d_sae, args.k, args.tokens, args.batch_size, args.seed
        )
    import peers  # bench/peers.py

    for label, fit in peers.installed_trainers(args.peers).items():

        def run(fit=fit):
            trained = fit(x_train, d_sae, args.k, args.tokens, args.batch_size, args.seed)
            return trained.reconstruct, trained.train_seconds

        trainers[label] = run

    results = {}
    for name, fit in trainers.items():
        torch.manual_seed(args.seed)
        reconstruct, seconds = fit()
        row = held_out(reconstruct, x_test, d_sae)
        if args.loss_contexts:
            spliced = loss_recovered(
                lambda x, r=reconstruct: r(x.float())[0],
                model,
                tokenizer,
                module,
                model_cfg,
                data,
                args.loss_contexts,
                progress=False,
            )
            row |= {k: spliced[k] for k in ("delta_ce", "kl_spliced", "loss_recovered")}
        row["train_seconds"] = seconds
        results[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)

    columns = [
        "fvu",
        "explained_variance",
        "l0",
        "dead_fraction",
        "delta_ce",
        "kl_spliced",
        "loss_recovered",
        "train_seconds",
    ]
    print("\n| SAE | " + " | ".join(columns) + " | FVU / ours |")
    print("|---" * (len(columns) + 2) + "|")
    base = next(iter(results.values()))["fvu"]
    for name, row in results.items():
        cells = [f"{row[c]:.4g}" if c in row else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['fvu'] / base:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
