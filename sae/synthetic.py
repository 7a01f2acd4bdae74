"""Activations made from a known dictionary of features: ground truth for SAEs, with no model.

    python train.py data=synthetic sae=matryoshka            # train, then print MCC / F1 against the truth
    python train.py data=synthetic synthetic.n_features=16384 synthetic.d_in=768 sae.d_sae=4096 sae.k=25

Real activations never say which features an SAE should have found; these do. After SynthSAEBench (Chanin &
Garriga-Alonso 2026, arXiv 2602.14687), whose ingredients these are (the code is ours):

- a dictionary of N unit directions [N, D] in D < N dimensions (superposition), random, optionally pushed
  apart by `orthogonalize_steps` of gradient descent on the squared overlaps;
- feature i, the i-th most frequent, fires with probability p_i, Zipfian in its rank from p_max down to p_min;
- firing is correlated through a Gaussian copula of low rank: feature i fires when
  z_i = g . F_i + sqrt(1 - |F_i|^2) e_i < Phi^-1(q_i), with g ~ N(0, I_r), e_i ~ N(0, 1), F [N, r];
- a forest over the most frequent features: R roots, each with `branching` children, `depth` levels down,
  laid out breadth first so that a parent is more frequent than its children and siblings are contiguous. A
  child fires only with its parent (its q_i = p_i / p_parent, so its marginal stays near p_i), at most one
  child of a parent fires (mutual exclusion), and a child's magnitude follows its parent's;
- a firing feature's magnitude is N(mean_i, std_i), mean_i falling linearly from `magnitude_start` (frequent)
  to `magnitude_end` (rare) and std_i ~ |N(s, s)|;
- x = sum_i a_i d_i + bias, plus optional isotropic noise.

Sample b of a stream is drawn from a generator seeded by (seed, b) alone, so a stream resumes exactly and every
SAE trained with the same `train.seed` sees the same samples. `ground_truth` measures a trained SAE against
the dictionary (`sae.metrics` defines each number).
"""

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from sae import metrics
from sae.config import SyntheticConfig, from_dict
from sae.files import load_tensors, save_tensors
from sae.model import SAE
from sae.stream import Stream

DICTIONARY = 0x5EED
"""The stream, in `seeded`'s terms, of the generator of the dictionary and its properties."""
FILE = "synthetic.safetensors"
"""The true dictionary in a run directory trained on synthetic activations."""


@dataclass
class Level:
    """One level of the hierarchy: features [start, start + n_parents * branching) whose parents are the
    features [parent_start, parent_start + n_parents), the children of a parent contiguous."""

    start: int
    parent_start: int
    n_parents: int
    branching: int

    @property
    def children(self) -> slice:
        return slice(self.start, self.start + self.n_parents * self.branching)

    @property
    def parents(self) -> slice:
        return slice(self.parent_start, self.parent_start + self.n_parents)


def levels(cfg: SyntheticConfig) -> list[Level]:
    """The hierarchy's levels below the roots, top down (none without a hierarchy)."""
    if cfg.hierarchy_roots == 0:
        return []
    out, start, width = [], cfg.hierarchy_roots, cfg.hierarchy_roots
    for _ in range(cfg.hierarchy_depth):
        out.append(Level(start, start - width, width, cfg.hierarchy_branching))
        start, width = start + width * cfg.hierarchy_branching, width * cfg.hierarchy_branching
    return out


def zipf_probabilities(n: int, exponent: float, p_max: float, p_min: float) -> torch.Tensor:
    """[n] firing probabilities (1 + i)^-exponent, mapped affinely onto [p_min, p_max]."""
    r = (1.0 + torch.arange(n, dtype=torch.float64)).pow(-exponent)
    span = (r[0] - r[-1]).clamp_min(1e-12)
    return (p_min + (p_max - p_min) * (r - r[-1]) / span).float()


def _orthogonalized(d: torch.Tensor, steps: int, lr: float = 3e-4, chunk: int = 2048) -> torch.Tensor:
    """Unit rows d [N, D] after `steps` of gradient descent on sum_{i != j} (d_i . d_j)^2, renormalised."""
    d = d.clone()
    for _ in range(steps):
        grad = torch.zeros_like(d)
        for i in range(0, len(d), chunk):
            g = d[i : i + chunk] @ d.T  # [C, N]
            g[:, i : i + chunk].fill_diagonal_(0)
            grad[i : i + chunk] = 4 * g @ d
        d = F.normalize(d - lr * grad, dim=1)
    return d


class Features:
    """A known dictionary of N features in D dimensions and how they fire; `sample` draws activations."""

    def __init__(self, cfg: SyntheticConfig, tensors: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.levels = levels(cfg)
        self.directions = tensors["directions"]  # [N, D] unit rows
        self.p = tensors["p"]  # [N] marginal firing probabilities
        self.q = tensors["q"]  # [N] firing probabilities given the parent fires (p for the rest)
        self.mean, self.std = tensors["mean"], tensors["std"]  # [N] magnitude when firing
        self.factor = tensors["factor"]  # [N, r] correlation factor
        self.bias = tensors["bias"]  # [D]
        self.threshold = torch.special.ndtri(self.q.double()).float()  # [N] z below which a feature fires
        self.residual = (1 - self.factor.pow(2).sum(dim=1)).clamp_min(0).sqrt()  # [N]

    @classmethod
    def make(cls, cfg: SyntheticConfig) -> "Features":
        """The dictionary `cfg` describes, the same for the same `cfg` (seeded by `cfg.seed`)."""
        # Not manual_seed(cfg.seed): an SAE initialised from the same seed would draw the same normals, and
        # start at the truth.
        g = seeded(cfg.seed, DICTIONARY, torch.device("cpu"))
        N, D = cfg.n_features, cfg.d_in
        directions = _orthogonalized(
            F.normalize(torch.randn(N, D, generator=g), dim=1), cfg.orthogonalize_steps
        )
        p = zipf_probabilities(N, cfg.zipf_exponent, cfg.p_max, cfg.p_min)
        q = p.clone()
        for lv in levels(cfg):
            parent_p = p[lv.parents].repeat_interleave(lv.branching)
            q[lv.children] = (p[lv.children] / parent_p).clamp(max=1.0)
        mean = torch.linspace(cfg.magnitude_start, cfg.magnitude_end, N)
        std = (cfg.magnitude_std + cfg.magnitude_std * torch.randn(N, generator=g)).abs()
        factor = cfg.correlation_scale * torch.randn(N, cfg.correlation_rank, generator=g)
        # Keep each feature's latent variable at unit variance: |F_i|^2 <= 0.99.
        factor *= (0.99 / factor.pow(2).sum(dim=1, keepdim=True).clamp_min(0.99)).sqrt()
        bias = cfg.bias_norm * F.normalize(torch.randn(D, generator=g), dim=0)
        tensors = {"directions": directions, "p": p, "q": q, "mean": mean, "std": std, "factor": factor}
        return cls(cfg, tensors | {"bias": bias})

    def to(self, device: str | torch.device) -> "Features":
        return Features(self.cfg, {k: v.to(device) for k, v in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        keys = ("directions", "p", "q", "mean", "std", "factor", "bias")
        return {k: getattr(self, k) for k in keys}

    def save(self, path: str | Path) -> None:
        """Writes the dictionary and its settings to the safetensors file `path`, atomically."""
        meta = {"synthetic": json.dumps(asdict(self.cfg))}
        save_tensors(path, {k: v.contiguous().cpu() for k, v in self.tensors().items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Features":
        """The dictionary `save` wrote to `path`."""
        tensors = load_tensors(path, "synthetic dictionary")
        with safe_open(str(path), "pt") as f:
            cfg = from_dict(SyntheticConfig, json.loads(f.metadata()["synthetic"]))
        return cls(cfg, tensors)

    # --- sampling ---

    def fire(self, n: int, g: torch.Generator) -> torch.Tensor:
        """[n, N] which features fire in n samples: the copula, then the hierarchy."""
        device, N, r = self.directions.device, len(self.q), self.factor.shape[1]
        if r:
            z = torch.randn(n, N, generator=g, device=device).mul_(self.residual)
            z.addmm_(torch.randn(n, r, generator=g, device=device), self.factor.T)
            fired = z < self.threshold
        else:
            fired = torch.rand(n, N, generator=g, device=device) < self.q
        for lv in self.levels:
            kids = fired[:, lv.children].view(n, lv.n_parents, lv.branching)  # [n, P, b]
            kids &= fired[:, lv.parents].unsqueeze(-1)
            if self.cfg.mutually_exclusive and lv.branching > 1:
                rows = (kids.sum(dim=-1) > 1).nonzero(as_tuple=True)  # parents with several children firing
                several = kids[rows]  # [m, b]
                score = torch.rand(several.shape, generator=g, device=device) * several
                kids[rows] = F.one_hot(score.argmax(dim=-1), lv.branching).bool()  # in place, in `fired`
        return fired

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, D], a [n, N]): n activations and the true feature activations they are made of."""
        fired = self.fire(n, g)
        rows, cols = fired.nonzero(as_tuple=True)  # row-major: sorted by row
        noise = torch.randn(len(rows), generator=g, device=fired.device)
        a = torch.zeros(fired.shape, device=fired.device)
        a[rows, cols] = (self.mean[cols] + self.std[cols] * noise).clamp_min(0)
        if self.cfg.scale_children:
            for lv in self.levels:  # top down: a grandchild follows its parent's scaled magnitude
                scale = a[:, lv.parents] / self.mean[lv.parents]  # [n, P]
                a[:, lv.children].view(n, lv.n_parents, lv.branching).mul_(scale.unsqueeze(-1))
        counts = torch.zeros(n + 1, dtype=torch.long, device=a.device)
        counts[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        code = torch.sparse_csr_tensor(counts, cols, a[rows, cols], size=a.shape, check_invariants=False)
        x = code @ self.directions  # [n, D]
        x += self.bias
        if self.cfg.noise:
            x += self.cfg.noise * torch.randn(x.shape, generator=g, device=x.device)
        return x, a

    def overlap(self, chunk: int = 2048) -> float:
        """Mean over features of the largest |cos| with another feature: how crowded the superposition is."""
        d, top = self.directions, []
        for i in range(0, len(d), chunk):
            c = (d[i : i + chunk] @ d.T).abs()
            c[:, i : i + chunk].fill_diagonal_(0)
            top.append(c.max(dim=1).values)
        return torch.cat(top).mean().item()


def seeded(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A generator for item `index` of the stream seeded `seed`, its 32-bit seed (all that torch's CPU
    generator keeps) a SplitMix64 hash of the two, so that no two (seed, index) pairs share a sequence by
    construction. A sample stream's batch b has index 2b; the evaluation's batch b, 2b + 1."""
    h = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % 2**64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) % 2**64
    return torch.Generator(device=device).manual_seed((h ^ (h >> 31)) & 0xFFFFFFFF)


class Samples(Stream):
    """[batch_size, D] activations drawn from `features` until `tokens`, batch after batch. Under data
    parallelism, rank r of W serves rows [r * batch_size, (r + 1) * batch_size) of the global batch of
    W * batch_size that one process would draw, so W processes train on the samples of one. Resumable: its
    state is the number of batches served."""

    def __init__(
        self, features: Features, batch_size: int, tokens: int, seed: int, rank: int = 0, world: int = 1
    ):
        self.features, self.batch_size, self.tokens, self.seed = features, batch_size, tokens, seed
        self.rank, self.world = rank, world
        self._served = 0

    def state(self) -> dict[str, Any]:
        return {"served": self._served}

    def restore(self, state: dict[str, Any]) -> None:
        self._unstarted()
        self._served = int(state["served"])

    def _run(self) -> Iterator[torch.Tensor]:
        device, B = self.features.directions.device, self.batch_size
        while self._served * B < self.tokens:
            x, _ = self.features.sample(B * self.world, seeded(self.seed, 2 * self._served, device))
            self._served += 1
            yield x[self.rank * B : (self.rank + 1) * B]


@torch.no_grad()
def ground_truth(sae: SAE, features: Features, samples: int, batch_size: int, seed: int) -> dict[str, float]:
    """How well `sae` recovered `features`, on `samples` fresh samples (evaluation batches of the stream
    seeded `seed`, never trained on): `gt_mcc`, `gt_f1` / `gt_precision` / `gt_recall`, `gt_uniqueness`,
    `gt_splitting`, `gt_absorption` (see `sae.metrics`; `gt_absorption_pairs`, the (sample, parent) pairs it is over), with the reconstruction's `fvu`,
    `explained_variance`, `l0` and `dead_fraction` on the same samples, and the truth's own `gt_l0` and
    `gt_overlap` (`Features.overlap`)."""
    device = sae.W_dec.device
    features = features.to(device)
    cos = metrics.cosines(sae.W_dec, features.directions)  # [F, N]
    best = cos.argmax(dim=1)  # [F]
    out = {
        "gt_mcc": metrics.mcc(cos),
        "gt_uniqueness": metrics.uniqueness(best, sae.d_sae),
        "gt_splitting": metrics.splitting(cos),
    }
    absorb = _Absorption(cos, features)
    F_ = sae.d_sae
    tp, fp, fn = (torch.zeros(F_, device=device, dtype=torch.long) for _ in range(3))
    fired_count = torch.zeros(F_, device=device)
    n = l0 = gt_l0 = 0
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum |x - x_hat|^2, sum |x|^2
    x_sum = torch.zeros(features.directions.shape[1], dtype=torch.float64, device=device)
    for b in range(math.ceil(samples / batch_size)):
        m = min(batch_size, samples - b * batch_size)
        x, a = features.sample(m, seeded(seed, 2 * b + 1, device))
        code = sae.encode(x)
        on = (code.acts > 0).float()  # [B, K]
        lit = torch.zeros(m, F_, device=device).scatter_add_(1, code.idx, on) > 0  # [B, F]
        truth = a > 0  # [B, N]
        hit = truth[:, best]  # [B, F] the best match of each latent fires
        tp += (lit & hit).sum(dim=0)
        fp += (lit & ~hit).sum(dim=0)
        fn += (~lit & hit).sum(dim=0)
        fired_count += lit.sum(dim=0)
        absorb.add(truth, lit, code.idx, on)
        x_hat = sae.decode(code)
        sums[0] += (x - x_hat).double().pow(2).sum()
        sums[1] += x.double().pow(2).sum()
        x_sum += x.double().sum(dim=0)
        n, l0, gt_l0 = n + m, l0 + int(on.sum()), gt_l0 + int(truth.sum())
    centered = sums[1] - x_sum.pow(2).sum() / n  # sum |x - mean|^2
    out |= {f"gt_{k}": v for k, v in metrics.detection(tp, fp, fn).items()}
    out |= {
        "gt_absorption": absorb.rate(),
        "gt_absorption_pairs": absorb.pairs,
        "gt_l0": gt_l0 / n,
        "gt_overlap": features.overlap(),
        "fvu": (sums[0] / centered.clamp_min(1e-12)).item(),
        "explained_variance": (1 - sums[0] / sums[1].clamp_min(1e-12)).item(),
        "l0": l0 / n,
        "dead_fraction": metrics.dead_fraction(fired_count),
        "eval_samples": n,
    }
    return out


class _Absorption:
    """Counts for `metrics`' absorption on the hierarchy of `features`: (sample, parent) pairs where a parent
    and one of its children fire, and those where the parent's latent is silent while another firing latent
    carries the parent's direction."""

    def __init__(self, cos: torch.Tensor, features: Features):
        self.levels = features.levels
        parents = (
            torch.cat([torch.arange(lv.parents.start, lv.parents.stop) for lv in self.levels])
            if self.levels
            else torch.zeros(0, dtype=torch.long)
        ).to(cos.device)  # [M]
        value, self.latent = cos[:, parents].max(dim=0)  # [M] each parent's own latent
        self.scored = value >= metrics.MATCH  # [M] parents that have one
        self.carries = (cos[:, parents] >= metrics.ABSORBED).float()  # [F, M]
        self.pairs = self.absorbed = 0

    def add(self, truth: torch.Tensor, lit: torch.Tensor, idx: torch.Tensor, on: torch.Tensor) -> None:
        if not self.levels:
            return
        n = len(truth)
        with_child = torch.cat(
            [
                truth[:, lv.parents] & truth[:, lv.children].view(n, lv.n_parents, lv.branching).any(dim=-1)
                for lv in self.levels
            ],
            dim=1,
        )  # [B, M]
        pairs = with_child & self.scored
        silent = ~lit[:, self.latent]  # [B, M]
        carried = F.embedding_bag(idx, self.carries, per_sample_weights=on, mode="sum") > 0  # [B, M]
        self.pairs += int(pairs.sum())
        self.absorbed += int((pairs & silent & carried).sum())

    def rate(self) -> float:
        return self.absorbed / self.pairs if self.pairs else 0.0
