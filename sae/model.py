"""The sparse autoencoder: one module, five architectures.

Every architecture shares the same parameters and the same affine maps,

    pre   = ReLU((x - b_dec) @ W_enc + b_enc)      # [B, F]
    x_hat = z @ W_dec + b_dec                      # [B, D]

with W_enc [D, F], b_enc [F], W_dec [F, D] (row i: latent i's direction), b_dec [D]. They differ only in the
activation that turns `pre` into the sparse code z and in the sparsity term of the loss:

| arch         | z (training)                                   | z (inference)         | sparsity from     |
|--------------|------------------------------------------------|-----------------------|-------------------|
| `topk`       | the k largest of each token (Gao et al. 2024)  | same                  | the activation    |
| `batchtopk`  | the k*B largest of the batch (Bussmann 2024)   | pre > one threshold   | the activation    |
| `matryoshka` | BatchTopK; every prefix of the dictionary      | pre > one threshold   | the activation    |
|              | reconstructs x on its own (Bussmann 2025)      |                       |                   |
| `jumprelu`   | pre * H(pre - theta_i) (Rajamanoharan 2024)    | same                  | L0 penalty        |
| `relu`       | pre (Anthropic, April 2024 update)             | same                  | L1 * ||W_dec_i||  |

Decoder rows are kept at unit norm for all but `relu`, whose penalty weights each latent by its decoder
norm instead. At inference the code is sparse: `Code(acts [B, K], idx [B, K])`, K = k for TopK and, for the
others, the largest number of active latents in the batch (rows with fewer are padded with zero
activations). `decode` gathers K decoder rows per token (`embedding_bag`) and never forms [B, F] @ [F, D].

Training TopK is sparse end to end (`_TopKEncode`, `_SparseDecode`): one [B, D] @ [D, F] matmul finds the
pre-activations, in bf16 under autocast; every other product touches only the K selected latents per token.
The encoder's and decoder's weight gradients are a [F, B] sparse matrix (the batch's codes, transposed into
CSR by one sort of the B*K indices) times a dense [B, D] one, so backward costs O(B*K*D), not O(B*F*D) (the
idea of Gao et al. 2024's sparse kernels, sec. 2.4 and appendix D, here with PyTorch's CSR products).
"""

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae.config import ARCHS
from sae.files import load_tensors, read_json, save_tensors, write_json
from sae.metrics import fvu

WEIGHTS, CONFIG = "sae.safetensors", "cfg.json"
# The CSR products used here are stable on CPU and CUDA; PyTorch still labels the layout beta.
warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)


class Code(NamedTuple):
    """The sparse code of a batch of tokens."""

    acts: torch.Tensor
    """[B, K] values of the active latents (> 0; 0 marks padding)."""
    idx: torch.Tensor
    """[B, K] indices of the active latents."""


class ForwardOutput(NamedTuple):
    """Inference: the reconstruction and the sparse code it came from."""

    x_hat: torch.Tensor
    """[B, D] reconstruction."""
    acts: torch.Tensor
    """[B, K] active latent values."""
    idx: torch.Tensor
    """[B, K] active latent indices."""


class Step(NamedTuple):
    """One training forward pass."""

    x_hat: torch.Tensor
    """[B, D] reconstruction by the whole dictionary."""
    losses: dict[str, torch.Tensor]
    """Named, already weighted loss terms; the training loss is their sum."""
    fired: torch.Tensor
    """[F] number of tokens of the batch each latent fired on."""
    l0: torch.Tensor
    """() mean number of active latents per token."""
    z: torch.Tensor | None = None
    """[B, F] latent activations, zero where inactive (the dense architectures; None for topk)."""
    code: Code | None = None
    """The sparse code (topk; None for the others)."""


# --- activations and their straight-through gradients ---------------------------------------------------


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() <= 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta). Gradient to pre through H; to theta the straight-through estimate
    -theta/eps * K((pre - theta)/eps) with a rectangle kernel K (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        d_theta = -(theta / ctx.eps) * _rectangle((pre - theta) / ctx.eps) * grad
        return grad * (pre > theta), d_theta.sum(dim=0), None


class _Heaviside(torch.autograd.Function):
    """H(pre - theta), no gradient to pre; to theta -1/eps * K((pre - theta)/eps) (ibid., eq. 12)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        d_theta = -(1.0 / ctx.eps) * _rectangle((pre - theta) / ctx.eps) * grad
        return None, d_theta.sum(dim=0), None


def _csr_t(idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The [n, B] CSR matrix with values[b, j] at (idx[b, j], b): a batch's sparse code, transposed. Repeated
    (latent, token) pairs add up."""
    B, K = idx.shape
    flat = idx.flatten()
    order = flat.argsort(stable=True)  # by latent, tokens ascending within each
    crow = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    # (not bincount: on CUDA it reads the largest index back to the host)
    crow[1:] = (
        torch.zeros(n, dtype=torch.long, device=idx.device)
        .index_add_(0, flat, torch.ones_like(flat))
        .cumsum(0)
    )
    return torch.sparse_csr_tensor(
        crow, order // K, values.flatten()[order], size=(n, B), check_invariants=False
    )


def _sparse_t_mm(idx: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    """S^T @ dense for the sparse [B, n] matrix S holding `values` [B, K] at columns `idx` [B, K]: [n, D]."""
    return torch.sparse.mm(_csr_t(idx, values.to(dense.dtype), n), dense)


class _TopKEncode(torch.autograd.Function):
    """(acts [B, K'], idx [B, K']): each token's k largest pre-activations ((x - b_dec) @ W_enc + b_enc),
    ReLU'd, then (with `aux` latents) the `k_aux` largest among those latents (AuxK's candidates).

    The [B, F] matmul runs in `dtype`. Backward touches only the selected latents: dW_enc = ((x - b_dec)^T G)
    with G the sparse [B, F] gradient, db_enc = G's column sums, db_dec = -W_enc @ db_enc.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, aux, k_aux, sort, dtype):
        xc = x - b_dec  # [B, D]
        pre = torch.addmm(b_enc.to(dtype), xc.to(dtype), W_enc.to(dtype))  # [B, F]
        values, idx = pre.topk(k, dim=1, sorted=sort)
        if aux is not None and len(aux):
            aux_values, j = pre.index_select(1, aux).topk(min(k_aux, len(aux)), dim=1, sorted=False)
            values, idx = torch.cat([values, aux_values], dim=1), torch.cat([idx, aux[j]], dim=1)
        acts = values.float().clamp_min(0)
        ctx.save_for_backward(xc, W_enc, idx, acts)
        ctx.mark_non_differentiable(idx)
        return acts, idx

    @staticmethod
    def backward(ctx, grad, _):
        xc, W_enc, idx, acts = ctx.saved_tensors
        grad = grad * (acts > 0)  # the ReLU
        d_W_enc = _sparse_t_mm(idx, grad, xc, W_enc.shape[1]).T  # [D, F], contiguous as its transpose
        d_b_enc = torch.zeros(W_enc.shape[1], device=grad.device).index_add_(0, idx.flatten(), grad.flatten())
        return None, d_W_enc, d_b_enc, -(W_enc @ d_b_enc), None, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 (or whatever autocast asks for) inside an autocast region of x's device, else x's dtype."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, F] keeping the k*B largest entries of the whole batch, the smallest kept value)."""
    values, flat = pre.flatten().topk(k * pre.shape[0], sorted=False)
    z = torch.zeros_like(pre).flatten().scatter(0, flat, values).view_as(pre)
    return z, values.min()


def sparse(z: torch.Tensor) -> Code:
    """A dense code z [B, F] as Code [B, K], K the most active latents any row has (at least 1)."""
    k = max(1, int((z > 0).sum(dim=1).max()))
    acts, idx = z.topk(k, dim=1, sorted=False)
    return Code(acts.clamp_min(0), idx)


# --- the module -----------------------------------------------------------------------------------------


class SAE(nn.Module):
    """A sparse autoencoder over activations of width `d_in` with `d_sae` latents.

    `k`: active latents per token (topk; the batch average for batchtopk and matryoshka). `prefixes`:
    Matryoshka prefix sizes, increasing, the last equal to `d_sae`. `bandwidth`: JumpReLU's kernel width
    eps. `threshold_init`: JumpReLU's initial theta.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int = 32,
        arch: str = "topk",
        prefixes: tuple[int, ...] = (),
        bandwidth: float = 0.001,
        threshold_init: float = 0.001,
        seed: int = 0,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"sae.arch={arch!r} is not one of {ARCHS}")
        if not 0 < k < d_sae:
            raise ValueError(
                f"sae.k={k} must be between 1 and the number of latents d_sae={d_sae} (exclusive)"
            )
        if arch == "matryoshka":
            prefixes = tuple(prefixes) or (d_sae,)
            if list(prefixes) != sorted(set(prefixes)) or prefixes[0] < 1 or prefixes[-1] != d_sae:
                raise ValueError(
                    f"matryoshka prefixes {list(prefixes)} must increase strictly from >= 1 to d_sae={d_sae}"
                )
        self.d_in, self.d_sae, self.k, self.arch = d_in, d_sae, k, arch
        self.prefixes, self.bandwidth = tuple(prefixes), bandwidth
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=g)
        # Anthropic's April 2024 update starts the unconstrained decoder's rows at norm 0.1.
        W_dec *= (0.1 if arch == "relu" else 1.0) / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [F, D]
        # Encoder starts as the decoder's transpose (Gao et al. 2024, sec. 2.4): fewer dead latents. It is held
        # as [F, D], row i latent i's encoder direction, and used as its transpose W_enc [D, F]: the sparse
        # backward makes its gradient in that layout, and the fused optimizer needs a contiguous one.
        self.encoder = nn.Parameter(W_dec.clone())  # [F, D]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # [F]
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # [D]
        if arch == "jumprelu":
            # theta itself is the parameter, not log(theta): Adam moves a log-parameterised threshold by a
            # relative step, so thresholds starting at 0.001 barely move.
            self.threshold = nn.Parameter(torch.full((d_sae,), threshold_init))  # [F]
        if arch in ("batchtopk", "matryoshka"):
            # Inference threshold: running mean of the smallest activation BatchTopK kept (Bussmann 2024).
            self.register_buffer("threshold", torch.zeros(()))

    @property
    def W_enc(self) -> torch.Tensor:
        """[D, F] encoder matrix (a view of `encoder` [F, D])."""
        return self.encoder.T

    # --- inference ---

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU((x - b_dec) @ W_enc + b_enc): [B, D] -> [B, F]."""
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def encode(self, x: torch.Tensor) -> Code:
        """The active latents of each token: [B, D] -> Code([B, K], [B, K])."""
        pre = self.pre_acts(x)  # [B, F]
        if self.arch == "topk":
            return Code(*pre.topk(self.k, dim=-1, sorted=False))
        if self.arch == "relu":
            return sparse(pre)
        return sparse(pre * (pre > self.threshold))

    def decode(self, code: Code) -> torch.Tensor:
        """sum_k acts[:, k] * W_dec[idx[:, k]] + b_dec: Code -> [B, D]."""
        return self.sum_rows(code) + self.b_dec

    def sum_rows(self, code: Code) -> torch.Tensor:
        """sum_k acts[:, k] * W_dec[idx[:, k]]: Code -> [B, D], gathering K decoder rows per token; its
        backward is PyTorch's fused embedding-bag kernels, sparse in both the activations and W_dec."""
        return F.embedding_bag(
            code.idx, self.W_dec, per_sample_weights=code.acts.to(self.W_dec.dtype), mode="sum"
        )

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        code = self.encode(x)
        return ForwardOutput(self.decode(code), code.acts, code.idx)

    def dense(self, code: Code) -> torch.Tensor:
        """The code as a dense [B, F] matrix."""
        z = torch.zeros(code.acts.shape[0], self.d_sae, dtype=code.acts.dtype, device=code.acts.device)
        return z.scatter_(1, code.idx, code.acts)

    # --- training ---

    def step(
        self,
        x: torch.Tensor,
        dead: torch.Tensor | None = None,
        sparsity_coef: float = 0.0,
        auxk_coef: float = 0.0,
        multi_topk: bool = False,
    ) -> Step:
        """The training forward pass of x [B, D] and its loss terms.

        Reconstruction terms are FVUs (scale-free). `dead` holds the indices of the latents AuxK may use
        (None or empty: none); `sparsity_coef` weights JumpReLU's L0 or ReLU's L1 term; `multi_topk` adds
        Gao et al.'s (sec. 5.3) L(4k)/8. Under autocast the large matmuls run in its dtype; reductions in fp32.
        """
        losses = {}
        use_auxk = bool(auxk_coef) and self.arch in ("topk", "batchtopk", "matryoshka")
        dead = dead if dead is not None and use_auxk else x.new_zeros(0, dtype=torch.long)
        if self.arch == "topk":
            kk = min(4 * self.k if multi_topk else self.k, self.d_sae)
            acts, idx = _TopKEncode.apply(
                x, self.W_enc, self.b_enc, self.b_dec, kk, dead, self.d_in // 2, multi_topk, _compute_dtype(x)
            )
            if multi_topk:
                losses["fvu_4k"] = fvu(x, self.decode(Code(acts[:, :kk], idx[:, :kk]))) / 8
            code = Code(acts[:, : self.k], idx[:, : self.k])
            x_hat = self.decode(code)
            losses["fvu"] = fvu(x, x_hat)
            if use_auxk:
                # Always present (zero while nothing is dead), so logged curves do not start mid-run.
                aux = Code(acts[:, kk:], idx[:, kk:])
                residual = (x - x_hat).detach()
                losses["auxk"] = (
                    auxk_coef * fvu(residual, self.sum_rows(aux)) if aux.idx.shape[1] else x.new_zeros(())
                )
            active = (code.acts > 0).float()
            fired = torch.zeros(self.d_sae, device=x.device).index_add_(
                0, code.idx.flatten(), active.flatten()
            )
            return Step(x_hat, losses, fired, active.sum(dim=1).mean(), code=code)

        if self.arch == "jumprelu":
            # In fp32 even under autocast: bf16's rounding of pre (0.4%) is coarser than the kernel's width.
            with torch.autocast(x.device.type, enabled=False):
                pre = self.pre_acts(x)  # [B, F]
        else:
            pre = self.pre_acts(x)
        if self.arch in ("batchtopk", "matryoshka"):
            z, smallest = batch_topk(pre, self.k)
            if self.training:
                with torch.no_grad():
                    # The first step sets the threshold; later ones average. No host sync on the hot path.
                    weight = torch.where(self.threshold > 0, 0.01, 1.0)
                    self.threshold.lerp_(smallest.detach().float(), weight)
            x_hat = z @ self.W_dec + self.b_dec
            if self.arch == "matryoshka":
                # Each prefix of the dictionary reconstructs x alone; the loss sums them (Bussmann 2025).
                part = self.b_dec.expand_as(x)
                start, prefix_losses = 0, []
                for end in self.prefixes[:-1]:
                    part = part + z[:, start:end] @ self.W_dec[start:end]
                    prefix_losses.append(fvu(x, part))
                    start = end
                if prefix_losses:
                    losses["prefix_fvu"] = torch.stack(prefix_losses).sum()
        elif self.arch == "jumprelu":
            z = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
            x_hat = z @ self.W_dec + self.b_dec
            l0 = _Heaviside.apply(pre, self.threshold, self.bandwidth).sum(dim=1).float().mean()
            losses["l0_penalty"] = sparsity_coef * l0
        else:  # relu
            z = pre
            x_hat = z @ self.W_dec + self.b_dec
            penalty = (z * self.W_dec.norm(dim=1)).sum(dim=1, dtype=torch.float32).mean()
            losses["l1_penalty"] = sparsity_coef * penalty
        x_hat = x_hat.float()
        losses["fvu"] = fvu(x, x_hat)
        if use_auxk:
            losses["auxk"] = auxk_coef * self.auxk(x, x_hat, pre, dead) if len(dead) else x.new_zeros(())
        active = z > 0
        return Step(x_hat, losses, active.sum(dim=0).float(), active.sum(dim=1).float().mean(), z=z)

    def auxk(
        self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        """AuxK (Gao et al. 2024, appendix A.2): the top-k_aux of the `dead` latents (indices), k_aux = D/2,
        reconstruct the main residual; normalized by the residual's variance so it is scale-free like the
        main loss."""
        residual = (x - x_hat).detach()  # [B, D]
        acts, j = pre.index_select(1, dead).topk(min(self.d_in // 2, len(dead)), dim=-1, sorted=False)
        return fvu(residual, self.sum_rows(Code(acts.float().clamp_min(0), dead[j])))

    @property
    def unit_decoder(self) -> bool:
        """Whether decoder rows are held at unit norm during training (all but `relu`)."""
        return self.arch != "relu"

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescales decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Projects out the part of each decoder row's gradient along the row, which would only change its
        norm (undone by `normalize_decoder` anyway) and distort Adam's statistics (Bricken et al. 2023)."""
        if self.W_dec.grad is not None:
            along = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1)  # [F]
            self.W_dec.grad.addcmul_(along[:, None], self.W_dec, value=-1)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Makes an SAE trained on `scale * x` take raw x: pre-activations are unchanged (W_enc * scale,
        b_dec / scale) and the reconstruction comes out in raw units (W_dec / scale)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    # --- persistence ---

    def config(self) -> dict:
        cfg = {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k}
        if self.arch == "matryoshka":
            cfg["prefixes"] = list(self.prefixes)
        if self.arch == "jumprelu":
            cfg["bandwidth"] = self.bandwidth
        return cfg

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Writes `sae.safetensors` and `cfg.json` (plus `extra` keys) into directory `path`, atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.float() for k, v in self.state_dict().items()}
        tensors["W_enc"] = tensors.pop("encoder").T.contiguous()  # files hold W_enc [D, F]
        save_tensors(path / WEIGHTS, tensors)
        write_json(path / CONFIG, self.config() | (extra or {}))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SAE":
        """Loads an SAE saved with `save` from directory `path`. A missing, truncated or corrupt file, a
        cfg.json key that is missing or bad, or a tensor whose shape disagrees with cfg.json raises an error
        naming the file (and the key or tensor)."""
        path = Path(path)
        for name in (WEIGHTS, CONFIG):
            if not (path / name).exists():
                raise FileNotFoundError(
                    f"{path / name} does not exist: is {str(path)!r} an SAE run directory?"
                )
        cfg = read_config(path)
        try:
            sae = cls(
                cfg["d_in"],
                cfg["d_sae"],
                cfg["k"],
                arch=cfg.get("arch", "topk"),
                prefixes=tuple(cfg.get("prefixes", ())),
                bandwidth=cfg.get("bandwidth", 0.001),
            )
        except ValueError as err:
            raise ValueError(f"SAE config {path / CONFIG} is invalid: {err}") from None
        tensors = load_tensors(path / WEIGHTS, "SAE weights file")
        expected = {k: list(v.shape) for k, v in sae.state_dict().items()}
        expected["W_enc"] = expected.pop("encoder")[::-1]  # files hold W_enc [D, F]
        shapes = {k: list(v.shape) for k, v in tensors.items()}
        for key in sorted(expected.keys() | shapes.keys()):
            if key not in shapes:
                raise ValueError(
                    f"SAE weights file {path / WEIGHTS} lacks tensor {key!r} (expected shape {expected[key]} for "
                    f"arch={sae.arch!r}); it holds {sorted(shapes)}"
                )
            if key not in expected:
                raise ValueError(
                    f"SAE weights file {path / WEIGHTS} holds tensor {key!r}, which an arch={sae.arch!r} SAE "
                    f"does not have; expected {sorted(expected)}"
                )
            if shapes[key] != expected[key]:
                raise ValueError(
                    f"SAE weights file {path / WEIGHTS}: tensor {key!r} has shape {shapes[key]}, but {CONFIG} "
                    f"(d_in={sae.d_in}, d_sae={sae.d_sae}) expects {expected[key]}"
                )
        tensors["encoder"] = tensors.pop("W_enc").T
        sae.load_state_dict(tensors)
        return sae.to(device)


def read_config(path: str | Path) -> dict:
    """The `cfg.json` of the SAE saved in directory `path`, checked to name a valid arch and positive integer
    `d_in`, `d_sae` and `k`."""
    file = Path(path) / CONFIG
    cfg = read_json(file, "SAE config")
    for key in ("d_in", "d_sae", "k"):
        if key not in cfg:
            raise ValueError(f"SAE config {file} lacks key {key!r}; it holds {sorted(cfg)}")
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"SAE config {file}: {key}={value!r} must be a positive integer")
    arch = cfg.get("arch", "topk")
    if arch not in ARCHS:
        raise ValueError(f"SAE config {file}: arch={arch!r} is not one of {ARCHS}")
    return cfg
