"""Ground-truth recovery against training budget and learning rate, on `data=synthetic`'s default dictionary
(4096 features in 256 dimensions, width 1024, k 12): does the F1 ordering of the architectures depend on
the budget?

    python bench/synthetic_budget.py --archs topk,batchtopk,matryoshka --lrs 3e-4,1e-3,4e-3 --tokens 2000000
    python bench/synthetic_budget.py --archs topk,batchtopk,matryoshka --lrs 4e-3 --tokens 8000000

Each SAE trains with `train()` (the pipeline's recipe) on the same samples (`train.seed` 0) and is scored by
`ground_truth` on 100k fresh samples; one line per SAE: F1, MCC, absorption and the rest.
"""

import argparse
import time
import warnings

from sae.config import SAEConfig, SyntheticConfig, TrainConfig
from sae.synthetic import Features, Samples, ground_truth
from sae.train import train

warnings.filterwarnings("ignore", category=UserWarning)
KEYS = (
    "gt_f1",
    "gt_mcc",
    "gt_absorption",
    "gt_precision",
    "gt_recall",
    "gt_uniqueness",
    "fvu",
    "l0",
    "dead_fraction",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="topk,batchtopk,matryoshka")
    parser.add_argument(
        "--lrs", default="4e-3", help="learning rates, comma-separated (4e-3 is the default at width 1024)"
    )
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training samples per SAE")
    args = parser.parse_args()
    features = Features.make(SyntheticConfig(n_features=4096, d_in=256, hierarchy_roots=32))
    print("| arch | lr | samples | " + " | ".join(KEYS) + " | s |")
    print("|---" * (len(KEYS) + 4) + "|")
    for arch in args.archs.split(","):
        for lr in (float(v) for v in args.lrs.split(",")):
            start = time.time()
            cfg = TrainConfig(
                tokens=args.tokens, batch_size=1024, lr=lr, log_every=10**9, eval_every=0, checkpoint_every=0
            )
            sae = train(
                SAEConfig(arch=arch, k=12, expansion_factor=4),
                cfg,
                Samples(features, 1024, cfg.tokens, seed=0),
            )
            m = ground_truth(sae, features, 100_000, 1024, seed=0)
            cells = " | ".join(f"{m[k]:.3f}" for k in KEYS)
            print(f"| {arch} | {lr:g} | {args.tokens:,} | {cells} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
