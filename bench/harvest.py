"""Harvest throughput against its limit and against what peers do, measured in one run.

    python bench/harvest.py                                  # SmolLM2-135M, block 15, bf16 where fast
    python bench/harvest.py model.layer=6 model.dtype=float32 --batches 6

Three ways to get the activations of block L for the same packed contexts:
- ours: `sae.harvest.activations` (forward stopped by a hook after block L, specials masked, float32 out);
- limit: a bare forward of a copy of the model truncated to blocks 0..L (nothing after it exists);
- full: the whole model with a capturing hook, as sparsify and delphi harvest.
Prints tokens/s of each and the ratios ours/limit and ours/full (absolute figures on shared machines are
noise; the ratios are the result).
"""

import argparse
import copy
import time

import torch

from sae import harvest
from sae.config import DataConfig, ModelConfig
from sae.data import packed_contexts


def _timed(fn, batches) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="model.* fields, e.g. model.layer=6 model.dtype=float32")
    parser.add_argument("--batches", type=int, default=4, help="batches of model.batch_size contexts to time")
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

    times = {name: _timed(fn, batches[1:]) for name, fn in (("ours", ours), ("limit", limit), ("full", full))}
    print(f"model {cfg.name}, hook {module}, dtype {next(model.parameters()).dtype}, "
          f"{args.batches} batches x {cfg.batch_size} contexts, {tokens} text tokens")  # fmt: skip
    for name, t in times.items():
        print(f"{name:>6}: {tokens / t:9.0f} tok/s")
    print(
        f"ours / limit = {times['limit'] / times['ours']:.2f}   ours / full-model hook = {times['full'] / times['ours']:.2f}"
    )


if __name__ == "__main__":
    main()
