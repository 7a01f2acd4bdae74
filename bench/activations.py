"""An activation file for benchmarks: harvest once, train many times.

    python bench/activations.py                       # SmolLM2-135M block 15, 600k train + 65k held-out tokens

Writes `$SAE_CACHE/bench/<model>-<module>-<train>-<test>.safetensors` holding `train` [B, D] and `test`
[B, D] (float32, massive activations dropped as in training), and reuses it when it exists.
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae import harvest
from sae.config import DataConfig, ModelConfig
from sae.data import cache_dir, packed_contexts
from sae.files import save_tensors


def activation_file(model_cfg: ModelConfig, data: DataConfig, train_tokens: int, test_tokens: int) -> Path:
    """The path of the activation file for these settings, harvesting it first if it does not exist."""
    model, tokenizer = harvest.load_model(model_cfg)
    module = harvest.resolve_module(model, model_cfg)
    name = f"{model_cfg.name}-{module}-{Path(data.path).name}-{train_tokens}-{test_tokens}.safetensors"
    path = cache_dir() / "bench" / name.replace("/", "_")
    if path.exists():
        return path
    tensors = {}
    for split, tokens in (("train", train_tokens), ("test", test_tokens)):
        contexts = packed_contexts(data, tokenizer, split, model_cfg.batch_size)
        tensors[split] = harvest.harvest_tensors(model, [module], contexts, tokens, model_cfg.max_norm_ratio)[
            module
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors)
    return path


def load(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [B, D], test [B, D]) from an activation file."""
    tensors = load_file(str(path))
    return tensors["train"], tensors["test"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=ModelConfig().layer)
    parser.add_argument("--train-tokens", type=int, default=600_000)
    parser.add_argument("--test-tokens", type=int, default=65_536)
    args = parser.parse_args()
    path = activation_file(ModelConfig(layer=args.layer), DataConfig(), args.train_tokens, args.test_tokens)
    train, test = load(path)
    print(f"{path}: train {tuple(train.shape)}, test {tuple(test.shape)}")
