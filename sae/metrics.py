"""What researchers report about an SAE, as pure functions.

- FVU, fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (centered, over the
  batch); 1 - FVU is the explained variance.
- L0: mean number of non-zero latents per token.
- Dead fraction: latents that never fired over a span of tokens.
- Loss recovered: the language model's next-token cross-entropy with the SAE's reconstruction spliced in
  place of the hooked activation, between the clean model (1.0) and zero-ablation of it (0.0):
  (CE_zero - CE_spliced) / (CE_zero - CE_clean). Only text positions are replaced and scored; BOS/EOS stay.
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
    targets = ids[:, 1:].to(model.device)
    scored = mask[:, 1:]
    ce = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
    return ce.item(), int(scored.sum())
