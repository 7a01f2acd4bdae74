"""Our SAE exported to SAELens, loaded by SAELens, on real activations: do the codes and reconstructions agree?

    python bench/saelens_export.py runs/demo                  # a run directory (or any saved SAE directory)
    python bench/saelens_export.py /tmp/bench_sae --layer 15  # an SAE whose cfg.json names no hook

Needs sae-lens (`pip install -e .[bench]`). Exports with `sae.formats.to_saelens`, loads the export with
`sae_lens.SAE.load_from_disk`, runs both on held-out activations of the SAE's model and module (the cached
held-out tokens of `bench/activations.py` where they exist, else a fresh harvest), imports the export back with
`from_saelens`, and prints the largest differences.
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from sae import harvest
from sae.config import DataConfig, ModelConfig
from sae.data import cache_dir, packed_contexts
from sae.formats import from_saelens, to_saelens
from sae.model import SAE, read_config


def held_out(model_cfg: ModelConfig, tokens: int) -> torch.Tensor:
    """[B, D] held-out activations: the bench cache's `test` split if it exists, else harvested now."""
    model, tokenizer = harvest.load_model(model_cfg)
    module = harvest.resolve_module(model, model_cfg)
    for path in sorted((cache_dir() / "bench").glob(f"{model_cfg.name}-{module}-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            print(f"activations: {path} (test split)")
            return f.get_tensor("test")[:tokens].float()
    contexts = packed_contexts(DataConfig(), tokenizer, "test", model_cfg.batch_size)
    return harvest.harvest_tensors(model, [module], contexts, tokens, model_cfg.max_norm_ratio)[
        module
    ].float()


@torch.no_grad()
def compare(sae_dir: Path, x: torch.Tensor, model: str, hook: str, chunk: int = 4096) -> None:
    """Prints the largest differences between our SAE, SAELens' load of its export, and its re-import."""
    import sae_lens

    ours = SAE.load(sae_dir).eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = to_saelens(sae_dir, tmp, model=model, hook=hook)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"\s*This SAE has non-empty", UserWarning)
            theirs = sae_lens.SAE.load_from_disk(out)
        back, _ = from_saelens(out)
    print(
        f"SAE: {sae_dir} ({ours.arch}, d_in {ours.d_in}, d_sae {ours.d_sae}, k {ours.k}) -> SAELens "
        f"{type(theirs).__name__} {sae_lens.__version__}; {len(x)} tokens"
    )
    dz = dx = db = scale = 0.0
    same = err = err_l = var = 0.0
    for xb in x.split(chunk):
        z, x_hat = ours.dense(ours.encode(xb)), ours(xb).x_hat  # [B, F], [B, D]
        z_l = theirs.encode(xb)
        x_hat_l = theirs.decode(z_l)
        dz, dx = max(dz, (z_l - z).abs().max().item()), max(dx, (x_hat_l - x_hat).abs().max().item())
        db = max(db, (back(xb).x_hat - x_hat).abs().max().item())
        scale = max(scale, x_hat.abs().max().item())
        same += ((z_l > 0) == (z > 0)).all(dim=1).sum().item()
        err += (x_hat - xb).double().pow(2).sum().item()
        err_l += (x_hat_l - xb).double().pow(2).sum().item()
        var += (xb - x.mean(0)).double().pow(2).sum().item()
    print(f"max |codes SAELens - ours|           {dz:.3g}")
    print(f"max |recon SAELens - ours|           {dx:.3g}  (max |recon| {scale:.3g})")
    print(f"max |recon from_saelens(export) - ours| {db:.3g}")
    print(f"tokens with the same active latents  {same / len(x):.4f}")
    print(f"FVU ours, SAELens                    {err / var:.6f}, {err_l / var:.6f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sae_dir", nargs="?", default="runs/demo", help="an SAE directory (sae.safetensors)")
    parser.add_argument(
        "--layer", type=int, default=15, help="block the SAE reads, if its cfg.json names none"
    )
    parser.add_argument("--tokens", type=int, default=16_384, help="held-out tokens to compare on")
    args = parser.parse_args()
    cfg = read_config(args.sae_dir)
    module = cfg.get("hook") or f"model.layers.{args.layer}"
    model_cfg = ModelConfig(
        name=cfg.get("model") or "smollm2-135m", module=module, dtype="float32", device="cpu"
    )
    compare(Path(args.sae_dir), held_out(model_cfg, args.tokens), model_cfg.name, module)
