"""Per-feature statistics in one streaming pass with bounded memory.

For every latent: how often it fires (density), its max and mean activation, and its `top_k` strongest
examples, each with provenance (dataset row, position) and a context window of token ids with the
latent's activation on each of them. Memory is O(F x top_k x window), whatever the number of tokens: each
batch's per-feature top-k is merged into the running top-k and the rest is dropped.
"""

import json
from pathlib import Path
from typing import Any

import torch

from sae.config import AnalyzeConfig
from sae.data import Contexts
from sae.files import save_tensors, write_text
from sae.model import SAE, Code


class FeatureStats:
    """Running per-feature density, max/mean activation and top-k examples with context windows."""

    def __init__(self, d_sae: int, cfg: AnalyzeConfig):
        self.cfg = cfg
        k, W = cfg.top_k, cfg.window_before + 1 + cfg.window_after
        self.tokens = 0
        self.count = torch.zeros(d_sae)  # [F] tokens fired on
        self.act_sum = torch.zeros(d_sae)  # [F]
        self.max_act = torch.zeros(d_sae)  # [F]
        self.top_act = torch.zeros(d_sae, k)  # [F, k]; 0 marks an empty slot
        self.top_row = torch.full((d_sae, k), -1, dtype=torch.long)  # [F, k]
        self.top_pos = torch.full((d_sae, k), -1, dtype=torch.long)  # [F, k]
        self.window_ids = torch.full((d_sae, k, W), -1, dtype=torch.long)  # [F, k, W]; -1 beyond the context
        self.window_acts = torch.zeros(d_sae, k, W)  # [F, k, W]

    @torch.no_grad()
    def update(self, z: torch.Tensor, batch: Contexts) -> None:
        """Folds in the dense latents z [N, T, F] of `batch` (masked positions must be zero)."""
        N, T, F = z.shape
        z = z.float().cpu()
        fired = z > 0
        self.tokens += int(batch.mask.sum())
        self.count += fired.sum(dim=(0, 1))
        self.act_sum += z.sum(dim=(0, 1))
        self.max_act = torch.maximum(self.max_act, z.amax(dim=(0, 1)))

        k = min(self.cfg.top_k, N * T)
        vals, flat = z.reshape(N * T, F).topk(k, dim=0)  # [k, F]: this batch's strongest tokens per feature
        vals, flat = vals.T, flat.T  # [F, k]
        n, t = flat // T, flat % T
        # Context windows around each candidate: positions t - before .. t + after of the same context.
        offsets = torch.arange(-self.cfg.window_before, self.cfg.window_after + 1)  # [W]
        wt = t[..., None] + offsets  # [F, k, W]
        inside = (wt >= 0) & (wt < T)
        wt = wt.clamp(0, T - 1)
        wn = n[..., None].expand_as(wt)
        ids = torch.where(inside, batch.ids[wn, wt], -1)
        feature = torch.arange(F)[:, None, None].expand_as(wt)
        acts = torch.where(inside, z[wn, wt, feature], 0.0)

        all_act = torch.cat([self.top_act, vals], dim=1)  # [F, k_old + k]
        keep = all_act.topk(self.cfg.top_k, dim=1).indices  # [F, top_k]
        self.top_act = all_act.gather(1, keep)
        self.top_row = torch.cat([self.top_row, batch.row[n, t]], dim=1).gather(1, keep)
        self.top_pos = torch.cat([self.top_pos, batch.pos[n, t]], dim=1).gather(1, keep)
        keep_w = keep[..., None].expand(-1, -1, ids.shape[-1])
        self.window_ids = torch.cat([self.window_ids, ids], dim=1).gather(1, keep_w)
        self.window_acts = torch.cat([self.window_acts, acts], dim=1).gather(1, keep_w)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as named tensors (what `features.safetensors` holds)."""
        return {
            "density": self.count / max(self.tokens, 1),
            "max_act": self.max_act,
            "mean_act": self.act_sum / self.count.clamp_min(1),
            "top_act": self.top_act, "top_row": self.top_row, "top_pos": self.top_pos,
            "window_ids": self.window_ids, "window_acts": self.window_acts,
        }  # fmt: skip


def place_latents(sae: SAE, code: Code, used: torch.Tensor) -> torch.Tensor:
    """Latents z [N, T, F] on the CPU with the code of B tokens at the B True positions of `used` [N, T]
    and zeros elsewhere (the layout `FeatureStats.update` takes)."""
    z = torch.zeros(*used.shape, sae.d_sae)
    z[used.cpu()] = sae.dense(code).float().cpu()
    return z


def dense_latents(sae: SAE, acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latents z [N, T, F] for activations [N, T, D], zero at masked positions."""
    return place_latents(sae, sae.encode(acts[mask.to(acts.device)].float()), mask)


@torch.no_grad()
def logit_lens(sae: SAE, model, k: int, chunk: int = 1024) -> tuple[torch.Tensor, ...]:
    """Tokens each feature's decoder direction promotes and suppresses through the final norm's scale and
    the unembedding: (top values, top ids, bottom values, bottom ids), each [F, k]."""
    W_U = model.get_output_embeddings().weight.float().cpu()  # [V, D]
    norm = getattr(getattr(model, "model", None), "norm", None)
    scale = norm.weight.float().cpu() if norm is not None and hasattr(norm, "weight") else 1.0
    outs = []
    directions = sae.W_dec.float().cpu()
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [F, D]
    for W in (directions * scale).split(chunk):  # [chunk, D]
        logits = W @ W_U.T  # [chunk, V]
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        outs.append((top.values, top.indices, bottom.values, bottom.indices))
    return tuple(torch.cat(parts) for parts in zip(*outs))


def token_strings(tokenizer) -> list[str]:
    """The decoded text of every token id, indexed by id."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def save_analysis(
    stats: FeatureStats,
    run_dir: str | Path,
    tokenizer,
    meta: dict,
    lens: tuple[torch.Tensor, ...] | None = None,
) -> Path:
    """Writes `analysis/features.safetensors` and `analysis/features.json` (the dashboard's input)."""
    out = Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    tensors = stats.tensors()
    if lens is not None:
        tensors |= dict(zip(("top_logit", "top_logit_id", "bottom_logit", "bottom_logit_id"), lens))
    save_tensors(out / "features.safetensors", tensors)

    vocab = token_strings(tokenizer)
    W = stats.cfg.window_before
    features = []
    for f in range(len(tensors["density"])):
        examples = []
        for j in range(stats.cfg.top_k):
            act = tensors["top_act"][f, j].item()
            if act <= 0:
                break
            ids = tensors["window_ids"][f, j].tolist()
            present = [i for i, tok in enumerate(ids) if tok >= 0]
            examples.append({
                "act": round(act, 4), "row": tensors["top_row"][f, j].item(), "pos": tensors["top_pos"][f, j].item(),
                "tokens": [vocab[ids[i]] for i in present],
                "acts": [round(a, 3) for a in tensors["window_acts"][f, j, present].tolist()],
                "center": present.index(W),
            })  # fmt: skip
        feature: dict[str, Any] = {
            "id": f, "density": tensors["density"][f].item(), "max_act": round(tensors["max_act"][f].item(), 4),
            "mean_act": round(tensors["mean_act"][f].item(), 4), "examples": examples,
        }  # fmt: skip
        if lens is not None:
            feature["top_logits"] = [
                [vocab[i], round(v, 3)] for v, i in zip(lens[0][f].tolist(), lens[1][f].tolist())
            ]
            feature["bottom_logits"] = [
                [vocab[i], round(v, 3)] for v, i in zip(lens[2][f].tolist(), lens[3][f].tolist())
            ]
        features.append(feature)
    meta = meta | {"n_tokens": stats.tokens, "window": [stats.cfg.window_before, stats.cfg.window_after]}
    write_text(out / "features.json", json.dumps(meta | {"features": features}))
    return out
