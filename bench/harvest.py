"""Harvest and analysis throughput against their limits and against what peers do, measured in one run.

    python bench/harvest.py                                  # SmolLM2-135M, block 15, bf16 where fast
    python bench/harvest.py model.layer=6 model.dtype=float32 --batches 12
    python bench/harvest.py --sae runs/demo                  # a trained SAE (random TopK otherwise)

Three ways to get the activations of block L for the same packed contexts:
- ours: `sae.harvest.activations` (forward stopped by a hook after block L, specials masked, float32 out);
- limit: a bare forward of a copy of the model truncated to blocks 0..L (nothing after it exists);
- full: the whole model with a capturing hook, as sparsify and delphi harvest.
And two on top of ours, with an SAE (`--sae` run directory, else a random TopK of 8 x d_in latents, k=32):
- encode: ours, then `SAE.encode` and `SAE.decode` of the same tokens;
- analysis: what `held_out_pass` does per batch with a `FeatureStats`: encode, decode and `update`.
Prints tokens/s of each and the ratios ours/limit, ours/full and analysis/encode: medians over batches, each
batch timed for all of them in turn (absolute figures on shared machines are noise; the ratios are the
result). A random SAE fires unlike a trained one, so prefer `--sae`; the output says which was used. Few
batches favour the costly start of an analysis, while every latent's top-k still has room.
"""

import argparse
import copy
import statistics
import time

import torch

from sae import harvest
from sae.analyze import FeatureStats
from sae.config import AnalyzeConfig, DataConfig, ModelConfig
from sae.data import packed_contexts
from sae.model import SAE


def _timed(fns: dict, batches) -> dict[str, list[float]]:
    """Seconds each of `fns` takes on each batch after the first (a warm-up), interleaved batch by batch in a
    rotating order so that load from other jobs on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn(batches[0])
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i, b in enumerate(batches[1:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name](b)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="model.* fields, e.g. model.layer=6 model.dtype=float32")
    parser.add_argument("--batches", type=int, default=8, help="batches of model.batch_size contexts to time")
    parser.add_argument("--sae", help="run directory of a trained SAE for the encode and analysis rows")
    args = parser.parse_args()
    fields = {k.removeprefix("model."): v for k, v in (o.split("=", 1) for o in args.overrides)}
    cfg = ModelConfig(**{k: type(getattr(ModelConfig(), k) or "")(v) for k, v in fields.items()})

    model, tokenizer = harvest.load_model(cfg)
    module = harvest.resolve_module(model, cfg)
    contexts = packed_contexts(DataConfig(), tokenizer, "train", cfg.batch_size)
    batches = [next(contexts) for _ in range(args.batches + 1)]
    layer = int(module.rsplit(".", 1)[-1])
    tokens = sum(int(b.mask.sum()) for b in batches[1:])

    # The limit: a copy whose block list ends at L and whose final norm is gone, so its last hidden state
    # is block L's output and nothing else runs.
    truncated = copy.deepcopy(model)
    path, layers = harvest.blocks(truncated)
    base_path, attr = path.rsplit(".", 1)
    base = truncated.get_submodule(base_path)
    setattr(base, attr, layers[: layer + 1])
    for norm in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, norm):
            setattr(base, norm, torch.nn.Identity())

    @torch.inference_mode()
    def limit(b):
        return base(input_ids=b.ids.to(model.device), use_cache=False).last_hidden_state

    @torch.inference_mode()
    def full(b):
        out = {}
        handle = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: out.update(h=o))
        try:
            model(input_ids=b.ids.to(model.device), use_cache=False)
        finally:
            handle.remove()
        return out["h"][b.mask]

    def ours(b):
        return next(harvest.activations(model, module, [b], max_norm_ratio=cfg.max_norm_ratio))[0]

    ref = harvest.capture(model, [module], batches[0].ids)[module]
    torch.testing.assert_close(limit(batches[0]).float(), ref.float())

    d_in = ref.shape[-1]
    if args.sae:
        sae, which = SAE.load(args.sae, device=model.device), f"trained, {args.sae}"
    else:
        sae, which = SAE(d_in, 8 * d_in, 32).to(model.device), "random (pass --sae for a trained one)"
    sae.eval()

    @torch.no_grad()
    def encode(b):
        x = ours(b)
        return sae.decode(sae.encode(x))

    stats = FeatureStats(sae.d_sae, AnalyzeConfig())  # one pass over all timed batches, as an analysis is
    update_s: list[float] = []

    @torch.no_grad()
    def analysis(b):
        x, batch, used = next(harvest.activations(model, module, [b], max_norm_ratio=cfg.max_norm_ratio))
        code = sae.encode(x)
        sae.decode(code)
        start = time.perf_counter()
        stats.update(code, used, batch)
        update_s.append(time.perf_counter() - start)

    times = _timed(dict(ours=ours, limit=limit, full=full, encode=encode, analysis=analysis), batches)
    n_tok = [int(b.mask.sum()) for b in batches[1:]]

    def faster(a: str, b: str) -> float:  # how many times faster a runs than b, the median over batches
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    print(
        f"model {cfg.name}, hook {module}, dtype {next(model.parameters()).dtype}, "
        f"{args.batches} batches x {cfg.batch_size} contexts, {tokens} text tokens (medians over batches)"
    )
    print(f"SAE {sae.arch}, d_sae {sae.d_sae}, k {sae.k}: {which}")
    for name, ts in times.items():
        print(f"{name:>8}: {statistics.median(n / t for n, t in zip(n_tok, ts)):9.0f} tok/s")
    print(
        f"ours / limit = {faster('ours', 'limit'):.2f}   ours / full-model hook = {faster('ours', 'full'):.2f}"
    )
    print(
        f"analysis / (harvest + encode) = {faster('analysis', 'encode'):.2f}  (>= 1: no slower); "
        f"FeatureStats.update {1000 * statistics.median(update_s[1:]):.0f} ms/batch, "
        f"{statistics.median(u / t for u, t in zip(update_s[1:], times['analysis'])):.1%} of analysis"
    )


if __name__ == "__main__":
    main()
