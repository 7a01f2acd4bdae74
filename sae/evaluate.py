"""Evaluation of a trained SAE on held-out tokens: FVU, L0 and dead latents in one pass, and the language
model's next-token loss with the SAE's reconstruction spliced in.

The metrics are defined in `sae.metrics`; held-out tokens are the rows `packed_contexts(..., "test", ...)`
gives (every `data.holdout_every`-th row), never trained on.
"""

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from sae import harvest
from sae.config import DataConfig, ModelConfig, TrainJob
from sae.data import packed_contexts
from sae.metrics import dead_fraction, firing_counts
from sae.model import SAE


@torch.no_grad()
def held_out_pass(
    sae: SAE,
    model,
    tokenizer,
    module: str,
    model_cfg: ModelConfig,
    data: DataConfig,
    tokens: int,
    keep: list | None = None,
) -> dict:
    """One pass over held-out tokens: FVU, L0 and dead fraction. `keep`, when given, receives each batch as
    (index, acts [B, D] float32 on the CPU, contexts, used): the held-out batches an analysis then encodes
    without a second forward (`scan.analysis_pass`)."""
    device = next(sae.parameters()).device
    sq_err = sum_x2 = l0_sum = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    n = text_tokens = 0
    counts = torch.zeros(sae.d_sae, device=device)
    contexts = packed_contexts(data, tokenizer, "test", model_cfg.batch_size)
    with tqdm(total=tokens, desc="held-out", unit="tok", unit_scale=True) as bar:
        batches = harvest.activations(model, module, contexts, tokens, model_cfg.max_norm_ratio)
        for i, (x, batch, used) in enumerate(batches):
            if keep is not None:
                keep.append((i, x.cpu(), batch, used))
            x = x.to(device)  # [B, D]
            code = sae.encode(x)
            x_hat = sae.decode(code)
            sq_err += (x - x_hat).double().pow(2).sum().item()
            sum_x += x.double().sum(dim=0).cpu()
            sum_x2 += x.double().pow(2).sum().item()
            l0_sum += (code.acts > 0).sum().item()
            counts += firing_counts(code.acts, code.idx, sae.d_sae)
            n += len(x)
            text_tokens += int(batch.mask.sum())
            bar.update(len(x))
    total_var = sum_x2 - sum_x.pow(2).sum().item() / n  # sum ||x - mean||^2
    return {
        "fvu": sq_err / total_var,
        "explained_variance": 1 - sq_err / sum_x2,
        "l0": l0_sum / n,
        "dead_fraction": dead_fraction(counts),
        "held_out_tokens": n,
        "outlier_fraction": 1 - n / text_tokens,
    }


@torch.no_grad()
def loss_recovered(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    model,
    tokenizer,
    module: str,
    model_cfg: ModelConfig,
    data: DataConfig,
    n_contexts: int,
    progress: bool = True,
) -> dict:
    """The LM's next-token loss on held-out contexts, clean, with `reconstruct` (raw activations [B, D] ->
    reconstructions) spliced in, and with the activation zeroed: CE of each, delta CE and KL (nats per
    token) of the spliced and zero-ablated runs, and the fraction of loss recovered.

    Tokens `keep_rows` skips (massive activations) keep their activation in both the spliced and the
    zero-ablated run, so both change exactly the tokens the SAE is evaluated on.
    """

    def only_kept(fn):
        def replace(x: torch.Tensor) -> torch.Tensor:
            keep = harvest.keep_rows(x, model_cfg.max_norm_ratio)[:, None]
            return torch.where(keep, fn(x).to(x.device), x)

        return replace

    replacements = {"spliced": only_kept(reconstruct), "zero": only_kept(torch.zeros_like)}
    bs = min(model_cfg.batch_size, n_contexts)
    n_batches = -(-n_contexts // bs)
    batches = itertools.islice(packed_contexts(data, tokenizer, "test", bs), n_batches)
    totals: dict[str, float] = {}
    for batch in tqdm(batches, desc="loss recovered", total=n_batches, disable=not progress):
        for key, value in spliced_losses(model, batch.ids, batch.mask, module, replacements).items():
            totals[key] = totals.get(key, 0.0) + value
    n = totals.pop("targets")
    out = {key: value / n for key, value in totals.items()}
    out["delta_ce"] = out["ce_spliced"] - out["ce_clean"]
    out["loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / (out["ce_zero"] - out["ce_clean"])
    return out


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


def _logits(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    module: str | None = None,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
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


def evaluate_sae(sae: SAE, model, tokenizer, module: str, job: TrainJob, keep: list | None = None) -> dict:
    """The held-out metrics of a trained SAE (`job.eval`): FVU, L0, dead fraction, and the spliced-in loss on
    `eval.loss_contexts` contexts. `keep`: as in `held_out_pass`."""
    device = next(sae.parameters()).device
    metrics = held_out_pass(sae, model, tokenizer, module, job.model, job.data, job.eval.tokens, keep)
    if job.eval.loss_contexts:
        metrics |= loss_recovered(
            lambda x: sae(x.to(device)).x_hat,
            model,
            tokenizer,
            module,
            job.model,
            job.data,
            job.eval.loss_contexts,
        )
    return metrics
