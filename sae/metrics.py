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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


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


@torch.inference_mode()
def spliced_losses(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    module: str,
    replacements: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    chunk_elements: int = 2**25,
) -> dict[str, float]:
    """Summed next-token CE of the clean model and of each replacement, and each one's summed KL from the
    clean next-token distribution, on contexts ids [N, T]; `targets` is the number of scored positions.

    Keys: `ce_clean`, `ce_<name>`, `kl_<name>` for each replacement name, `targets`. Runs `chunk_elements`
    logits (about 128 MiB in fp32) at a time, whatever the number of contexts.
    """
    contexts = max(1, chunk_elements // (ids.shape[1] * model.config.get_text_config().vocab_size))
    out: dict[str, float] = {}
    for part, part_mask in zip(ids.split(contexts), mask.split(contexts)):
        clean_logp = _logits(model, part, part_mask).log_softmax(dim=-1)  # [M, V] at scored positions
        targets = part[:, 1:].to(model.device)[part_mask[:, 1:].to(model.device)]
        sums = {"ce_clean": F.nll_loss(clean_logp, targets, reduction="sum").item(), "targets": len(targets)}
        for name, fn in replacements.items():
            logp = _logits(model, part, part_mask, module, fn).log_softmax(dim=-1)
            sums[f"ce_{name}"] = F.nll_loss(logp, targets, reduction="sum").item()
            sums[f"kl_{name}"] = F.kl_div(logp, clean_logp, log_target=True, reduction="sum").item()
        for key, value in sums.items():
            out[key] = out.get(key, 0) + value
    return out


def _logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, module: str | None = None,
            replace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Float32 next-token logits [M, V] at the positions whose target is a text token."""
    mask = mask.to(model.device)
    handle = None
    if module is not None and replace is not None:

        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[mask] = replace(h[mask].float()).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = dict(model.named_modules())[module].register_forward_hook(hook)
    try:
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits  # [N, T, V]
    finally:
        if handle is not None:
            handle.remove()
    return logits[:, :-1][mask[:, 1:]].float()


@torch.inference_mode()
def next_token_loss(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    module: str | None = None,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """(summed next-token CE, number of scored targets) on contexts ids [N, T].

    With `module` and `replace`, the module's output at text positions (`mask` [N, T]) is replaced by
    `replace(acts [B, D] float32) -> [B, D]` before the rest of the model runs.
    """
    logits = _logits(model, ids, mask, module, replace)  # [M, V]
    targets = ids[:, 1:].to(model.device)[mask[:, 1:].to(model.device)]
    return F.cross_entropy(logits, targets, reduction="sum").item(), len(targets)
