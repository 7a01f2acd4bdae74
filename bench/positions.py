"""Which positions after BOS are artefacts for an SAE's features: where each feature's strongest activation
falls, on held-out contexts of a finished run (its model, hook and corpus).

    python bench/positions.py runs/demo                  # 256 held-out contexts
    python bench/positions.py runs/demo --contexts 512

Prints, per context position t (1 = the first text token after BOS), the share of live features whose max
activation falls at t (uniform: 1 / (T - 1)), and, for each `analyze.skip_positions` value, how many of the
50 features with the highest max activation take it at the first position still counted. The default
`analyze.skip_positions` is the smallest value for which that count is no higher than at later positions.
Tokens `model.max_norm_ratio` drops (massive activations) are left out, as the analysis leaves them out.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae import harvest  # noqa: E402
from sae.data import packed_contexts  # noqa: E402
from sae.rundir import open_run  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run directory")
    parser.add_argument("--contexts", type=int, default=256)
    parser.add_argument("--show", type=int, default=8, help="positions to print")
    args = parser.parse_args()
    run = open_run(args.run_dir, device="cpu")
    assert run.job is not None and run.module is not None
    model_cfg, batch_size = run.job.model, run.job.model.batch_size
    zs = []
    for batch in packed_contexts(run.job.data, run.tokenizer, "test", batch_size):
        x = harvest.capture(run.model, [run.module], batch.ids)[run.module].float()  # [N, T, D]
        used = batch.mask.clone()
        used[used.clone()] = harvest.keep_rows(x[batch.mask], model_cfg.max_norm_ratio)
        z = run.sae.dense(run.sae.encode(x[used]))  # [B, F]
        dense = torch.zeros(*used.shape, z.shape[1])  # [N, T, F]
        dense[used] = z
        zs.append(dense)
        if sum(len(d) for d in zs) >= args.contexts:
            break
    z = torch.cat(zs)[: args.contexts]  # [N, T, F]
    peak = z.amax(dim=0)  # [T, F]
    alive = peak.amax(dim=0) > 0
    at = peak.argmax(dim=0)[alive]  # [F'] position of each live feature's max
    T = z.shape[1]
    print(f"{args.run_dir}: {len(z)} held-out contexts of {T} tokens, {int(alive.sum())} live features")
    print(f"share of features whose max falls at each position (uniform {1 / (T - 1):.2%}):")
    for t in range(1, args.show + 1):
        print(f"  {t:>2}  {(at == t).float().mean():.2%}")
    print("top 50 features by max act, with skip_positions=s: how many peak at position s+1, s+2")
    for skip in range(0, 5):
        kept = z.clone()
        kept[:, : skip + 1] = 0  # BOS and the skipped positions
        top = kept.amax(dim=(0, 1)).topk(50).indices
        where = kept.amax(dim=0).argmax(dim=0)[top].tolist()
        print(f"  s={skip}: {where.count(skip + 1)}, {where.count(skip + 2)}")


if __name__ == "__main__":
    main()
