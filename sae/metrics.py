"""What researchers report about an SAE, as pure functions.

Peers define these differently, so here is exactly what ours mean:
- FVU, fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, centered on the mean
  of the tokens evaluated. This is the number we optimise and report first (as sparsify does).
- Explained variance, uncentered: 1 - sum ||x - x_hat||^2 / sum ||x||^2, what SAELens' training logs and
  SAEBench print. It is higher than 1 - FVU whenever the activations have a non-zero mean. (SAELens'
  synthetic-data evaluation, and SynthSAEBench's published EV, is centered: 1 - FVU.)
- L0: mean number of non-zero latents per token.
- Dead fraction: latents that did not fire on any token of a span; dense fraction: latents firing on more
  than 10% of the tokens of a span.
- Spliced-in loss: the language model's next-token cross-entropy with the SAE's reconstruction in place of
  the hooked activation. Reported as raw delta CE in nats (spliced - clean), as the KL divergence of the
  spliced next-token distribution from the clean one (nats per token), and as the fraction of the loss
  recovered against zero ablation, (CE_zero - CE_spliced) / (CE_zero - CE_clean).
- BOS/EOS/PAD positions are masked everywhere: never trained on, never replaced, never scored.

Ground truth, on activations made from a known dictionary (`sae.synthetic`), as SynthSAEBench defines them
(Chanin & Garriga-Alonso 2026, arXiv 2602.14687) so that our figures compare with its published ones:
- MCC, mean correlation coefficient: the decoder rows and the true features matched one to one (the Hungarian
  algorithm on |cos|), the mean |cos| of the min(F, N) matched pairs (O'Neill et al. 2025, arXiv 2505.20254).
- Each latent's best match: the true feature of largest |cos| with its decoder row. Precision, recall and F1
  of a latent as a detector of its best match firing, averaged over the F latents (a latent that never
  fires, or whose match never does, scores 0).
- Uniqueness: distinct best matches / F (1: no two latents track the same feature).
- Splitting: of the true features some latent matches at |cos| >= MATCH, the fraction matched so by two or more.
- Absorption (Chanin et al. 2024, arXiv 2409.14507, on a known hierarchy): over the (sample, parent) pairs
  where a parent feature fires together with one of its children, and the parent's own latent (its best
  latent, at |cos| >= MATCH) exists, the fraction where that latent is silent while another firing latent
  carries the parent's direction (|cos| >= ABSORBED): the child's latent took the parent's place.
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MATCH = 0.5
"""|cos| at which a decoder row counts as a true feature's latent (splitting, absorption)."""
ABSORBED = 0.2
"""|cos| with a parent's direction at which another latent counts as carrying it: well above the overlap of
unrelated directions in superposition (about 0.15 at most for 16k random directions in 768 dimensions)."""


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained of x_hat [B, D] for x [B, D] (centered on the batch mean)."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return residual / total.clamp_min(1e-12)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Uncentered explained variance, 1 - sum ||x - x_hat||^2 / sum ||x||^2 (SAELens' definition)."""
    return 1 - (x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)


def l0(acts: torch.Tensor) -> torch.Tensor:
    """Mean count of non-zero latents per token, for latents [B, F] or active values [B, K]."""
    return (acts > 0).float().sum(dim=-1).mean()


def firing_counts(acts: torch.Tensor, idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    """How many tokens each of the d_sae latents fired on, from a sparse code ([B, K] values and indices)."""
    return torch.zeros(d_sae, device=acts.device).index_add_(0, idx.flatten(), (acts > 0).flatten().float())


def dead_fraction(counts: torch.Tensor) -> float:
    """Fraction of latents whose firing count [F] is zero."""
    return (counts == 0).float().mean().item()


def cosines(W_dec: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|cos| [F, N] between decoder rows W_dec [F, D] and true feature directions truth [N, D]."""
    a = torch.nn.functional.normalize(W_dec.float(), dim=1)
    b = torch.nn.functional.normalize(truth.float().to(a.device), dim=1)
    return (a @ b.T).abs()


def mcc(cos: torch.Tensor) -> float:
    """Mean |cos| of the optimal one-to-one matching of latents to true features, from |cos| [F, N]: the
    mean over the min(F, N) matched pairs of the largest such sum (Hungarian algorithm)."""
    c = cos.detach().cpu().numpy().astype(np.float64)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].mean())


def uniqueness(best: torch.Tensor, d_sae: int) -> float:
    """Distinct true features among the latents' best matches best [F], over F latents."""
    return best.unique().numel() / d_sae


def splitting(cos: torch.Tensor) -> float:
    """Of the true features that are some latent's best match at |cos| >= MATCH, the fraction that are so for
    two or more latents; from |cos| [F, N]. 0 when no feature is matched."""
    value, best = cos.max(dim=1)  # [F]
    counts = torch.bincount(best[value >= MATCH], minlength=cos.shape[1])  # [N]
    matched = int((counts >= 1).sum())
    return float((counts >= 2).sum()) / matched if matched else 0.0


def detection(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, float]:
    """Mean precision tp/(tp+fp), recall tp/(tp+fn) and F1 2PR/(P+R) over latents, from per-latent counts
    [F] of true positives, false positives and false negatives; an undefined ratio counts 0."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), 0.0)
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0
    )
    return {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()}
