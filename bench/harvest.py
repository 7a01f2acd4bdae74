"""Harvest and analysis throughput against their limits and against what peers do, measured in one run.

    python bench/harvest.py                                  # SmolLM2-135M, block 15, bf16 where fast
    python bench/harvest.py model.layer=6 model.dtype=float32 --batches 12
    python bench/harvest.py --sae runs/demo                  # a trained SAE (random TopK otherwise)
    python bench/harvest.py model.device=cuda model.dtype=bfloat16 model.batch_size=256   # a GPU's batch

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

Also prints the model FLOP/s of ours, the limit and the full model, and on a GPU their fraction of its dense
bf16 peak (`bench/gpu.py`). A forward costs 2 FLOPs per parameter it multiplies by, per token: blocks 0..L for
ours and the limit, every block plus the unembedding for the full model (embedding lookups and attention's
2 x 2 x T x D per block and token, 4% of a SmolLM2 block at T = 128, are not counted).
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # noqa: E402  (bench/gpu.py)

from sae import harvest  # noqa: E402
from sae.analyze import FeatureStats  # noqa: E402
from sae.config import AnalyzeConfig, DataConfig, ModelConfig  # noqa: E402
from sae.data import packed_contexts  # noqa: E402
from sae.model import SAE  # noqa: E402


def _timed(fns: dict, batches, device: torch.device) -> dict[str, list[float]]:
    """Seconds each of `fns` takes on each batch after the first (a warm-up), interleaved batch by batch in a
    rotating order so that load from other jobs on a shared machine falls on all of them alike. The clock
    stops once `device` has finished the work queued."""
    for fn in fns.values():
        fn(batches[0])
    gpu.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i, b in enumerate(batches[1:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name](b)
            gpu.synchronize(device)
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
        gpu.synchronize(model.device)
        start = time.perf_counter()
        stats.update(code, used, batch)
        gpu.synchronize(model.device)
        update_s.append(time.perf_counter() - start)

    fns = dict(ours=ours, limit=limit, full=full, encode=encode, analysis=analysis)
    times = _timed(fns, batches, model.device)
    n_tok = [int(b.mask.sum()) for b in batches[1:]]
    tok_s = {name: statistics.median(n / t for n, t in zip(n_tok, ts)) for name, ts in times.items()}

    def faster(a: str, b: str) -> float:  # how many times faster a runs than b, the median over batches
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    print(
        f"model {cfg.name}, hook {module}, dtype {next(model.parameters()).dtype}, "
        f"{args.batches} batches x {cfg.batch_size} contexts, {tokens} text tokens (medians over batches)"
    )
    print(f"SAE {sae.arch}, d_sae {sae.d_sae}, k {sae.k}: {which}")
    for name in times:
        print(f"{name:>8}: {tok_s[name]:9.0f} tok/s")
    run_params = sum(p.numel() for p in layers[: layer + 1].parameters())  # `layers`: all blocks
    full_params = sum(p.numel() for p in layers.parameters()) + model.get_output_embeddings().weight.numel()
    print(
        f"FLOPs per token: 2 x {run_params / 1e6:.2f}M parameters of blocks 0..{layer} (ours, limit), "
        f"2 x {full_params / 1e6:.2f}M of all blocks and the unembedding (full)"
    )
    dtype = next(model.parameters()).dtype
    for name, params in (("ours", run_params), ("limit", run_params), ("full", full_params)):
        achieved = tok_s[name] * 2 * params
        print(
            f"{name:>8}: {achieved / 1e12:9.4g} TFLOP/s, {gpu.peak_fraction(achieved, model.device, dtype)}"
        )
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
