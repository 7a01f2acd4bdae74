"""The sparse autoencoder.

TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

    z     = TopK(ReLU((x - b_dec) @ W_enc + b_enc))      # [B, F], K non-zeros per row
    x_hat = z @ W_dec + b_dec                            # [B, D]

with W_enc [D, F], b_enc [F], W_dec [F, D] (unit-norm rows: each latent's direction), b_dec [D]. The
code keeps only the K active values and their indices, and decodes them as a weighted sum of K decoder
rows (`embedding_bag`), never materialising the dense [B, F] @ [F, D] product.
"""

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sae.files import save_tensors, write_json

WEIGHTS, CONFIG = "sae.safetensors", "cfg.json"


class Code(NamedTuple):
    """The sparse code of a batch of tokens."""

    acts: torch.Tensor
    """[B, K] values of the active latents (>= 0)."""
    idx: torch.Tensor
    """[B, K] indices of the active latents."""


class ForwardOutput(NamedTuple):
    """Everything the training loop needs from one forward pass."""

    x_hat: torch.Tensor
    """[B, D] reconstruction."""
    acts: torch.Tensor
    """[B, K] active latent values."""
    idx: torch.Tensor
    """[B, K] active latent indices."""
    pre_acts: torch.Tensor
    """[B, F] encoder pre-activations after ReLU (AuxK draws dead latents from these)."""


class SAE(nn.Module):
    """A TopK sparse autoencoder over activations of width `d_in` with `d_sae` latents."""

    def __init__(self, d_in: int, d_sae: int, k: int, seed: int = 0):
        super().__init__()
        if not 0 < k < d_sae:
            raise ValueError(
                f"sae.k={k} must be between 1 and the number of latents d_sae={d_sae} (exclusive)"
            )
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [F, D]
        # Encoder starts as the decoder's transpose (Gao et al. 2024, sec. 2.4): fewer dead latents.
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [D, F]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # [F]
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # [D]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU((x - b_dec) @ W_enc + b_enc): [B, D] -> [B, F]."""
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def encode(self, x: torch.Tensor) -> Code:
        """The K largest latents of each token: [B, D] -> Code([B, K], [B, K])."""
        acts, idx = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return Code(acts, idx)

    def decode(self, code: Code) -> torch.Tensor:
        """sum_k acts[:, k] * W_dec[idx[:, k]] + b_dec: Code -> [B, D]."""
        x = F.embedding_bag(
            code.idx, self.W_dec, per_sample_weights=code.acts.to(self.W_dec.dtype), mode="sum"
        )
        return x + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        pre = self.pre_acts(x)  # [B, F]
        acts, idx = pre.topk(self.k, dim=-1, sorted=False)  # [B, K]
        return ForwardOutput(self.decode(Code(acts, idx)), acts, idx, pre)

    def dense(self, code: Code) -> torch.Tensor:
        """The code as a dense [B, F] matrix."""
        z = torch.zeros(code.acts.shape[0], self.d_sae, dtype=code.acts.dtype, device=code.acts.device)
        return z.scatter_(1, code.idx, code.acts)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescales decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Projects out the part of each decoder row's gradient along the row, which would only change its
        norm (undone by `normalize_decoder` anyway) and distort Adam's statistics (Bricken et al. 2023)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec

    def config(self) -> dict:
        return {"arch": "topk", "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k}

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Writes `sae.safetensors` and `cfg.json` (plus `extra` keys) into directory `path`, atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / WEIGHTS, {k: v.float() for k, v in self.state_dict().items()})
        write_json(path / CONFIG, self.config() | (extra or {}))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SAE":
        """Loads an SAE saved with `save` from directory `path`."""
        path = Path(path)
        for name in (WEIGHTS, CONFIG):
            if not (path / name).exists():
                raise FileNotFoundError(
                    f"{path / name} does not exist: is {str(path)!r} an SAE run directory?"
                )
        cfg = json.loads((path / CONFIG).read_text())
        sae = cls(cfg["d_in"], cfg["d_sae"], cfg["k"])
        sae.load_state_dict(load_file(str(path / WEIGHTS)))
        return sae.to(device)


def read_config(path: str | Path) -> dict:
    """The `cfg.json` of the SAE saved in directory `path`."""
    return json.loads((Path(path) / CONFIG).read_text())
