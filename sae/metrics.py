"""What researchers report about an SAE, as pure functions.

Peers define these differently, so here is exactly what ours mean:
- FVU, fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, centered on the mean
  of the tokens evaluated. This is the number we optimise and report first (as sparsify does).
- Explained variance, uncentered: 1 - sum ||x - x_hat||^2 / sum ||x||^2, what SAELens and SAEBench print.
  It is higher than 1 - FVU whenever the activations have a non-zero mean.
- L0: mean number of non-zero latents per token.
- Dead fraction: latents that did not fire on any token of a span; dense fraction: latents firing on more
  than 10% of the tokens of a span.
- Spliced-in loss: the language model's next-token cross-entropy with the SAE's reconstruction in place of
  the hooked activation. Reported as raw delta CE in nats (spliced - clean), as the KL divergence of the
  spliced next-token distribution from the clean one (nats per token), and as the fraction of the loss
  recovered against zero ablation, (CE_zero - CE_spliced) / (CE_zero - CE_clean).
- BOS/EOS/PAD positions are masked everywhere: never trained on, never replaced, never scored.
"""

import torch


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
