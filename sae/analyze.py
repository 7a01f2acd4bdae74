"""Per-feature statistics in one streaming pass with bounded memory.

For every latent: how often it fires (density), its max and mean activation, and its `top_k` strongest
examples, each with provenance (dataset row, position) and a context window of token ids with the
latent's activation on each of them. Memory is O(F x top_k x window), whatever the number of tokens: each
batch's per-feature top-k is merged into the running top-k and the rest is dropped. The work is done on the
sparse code (B x K active latents), never on the dense latents [N, T, F].
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
    def update(self, code: Code, used: torch.Tensor, batch: Contexts) -> None:
        """Folds in the sparse code of `batch`: Code([B, K], [B, K]) of the B True positions of `used` [N, T]
        in row-major order (what `harvest.activations` yields and `SAE.encode` makes of it); zero acts are
        padding, and a token's live latents are distinct.

        Never forms the dense latents [N, T, F]: only (token, latent, act) triples above their latent's
        current k-th best value can enter the top-k, and context windows are built for those alone.
        """
        F, k = len(self.count), self.cfg.top_k
        acts, idx = code.acts.detach().float().cpu(), code.idx.cpu()  # [B, K]
        used = used.cpu()
        nt = used.nonzero()  # [B, 2] (n, t) of each token
        B = len(nt)
        if acts.shape[0] != B:
            raise ValueError(f"the code holds {acts.shape[0]} tokens but `used` marks {B} positions")
        self.tokens += int(batch.mask.sum())
        live = acts > 0
        b = torch.arange(B)[:, None].expand_as(idx)[live]  # [L] token of each live triple
        f, a = idx[live], acts[live]  # [L]
        self.count.index_add_(0, f, torch.ones_like(a))
        self.act_sum.index_add_(0, f, a)
        self.max_act.scatter_reduce_(0, f, a, "amax")

        # Candidates: triples that beat their latent's k-th best so far (0 while its top-k has room),
        # grouped by latent, strongest first, at most k per latent.
        above = a > self.top_act[f, -1]
        b, f, a = b[above], f[above], a[above]
        if not len(a):
            return
        a, order = a.sort(descending=True)
        b, f = b[order], f[order]
        f, order = f.sort(stable=True)
        b, a = b[order], a[order]
        feats, counts = f.unique_consecutive(return_counts=True)  # [U]
        start = counts.cumsum(0) - counts
        rank = torch.arange(len(f)) - start.repeat_interleave(counts)
        slot = rank < k
        u = torch.arange(len(feats)).repeat_interleave(counts)[slot]  # [C] candidate -> its latent's row
        b, f, a, rank = b[slot], f[slot], a[slot], rank[slot]

        # Windows around the candidates: positions t - before .. t + after of the same context, with the
        # candidate latent's act at each, looked up in the code by the sorted key (token, latent).
        n, t = nt[b].T  # [C]
        offsets = torch.arange(-self.cfg.window_before, self.cfg.window_after + 1)  # [W]
        wt = t[:, None] + offsets  # [C, W]
        inside = (wt >= 0) & (wt < used.shape[1])
        wt = wt.clamp(0, used.shape[1] - 1)
        wn = n[:, None].expand_as(wt)
        ids = torch.where(inside, batch.ids[wn, wt], -1)
        token = torch.full(used.shape, -1)  # [N, T] row of the code each position came from, -1 if none
        token[used] = torch.arange(B)
        wb = torch.where(inside, token[wn, wt], -1)  # [C, W]
        idx_sorted, order = torch.where(live, idx, F).sort(dim=1)  # padding last within each token
        keys = (torch.arange(B)[:, None] * (F + 1) + idx_sorted).flatten()  # [B * K] increasing
        query = wb * (F + 1) + f[:, None]  # [C, W]
        at = torch.searchsorted(keys, query).clamp_max(len(keys) - 1)
        w_acts = torch.where((wb >= 0) & (keys[at] == query), acts.gather(1, order).flatten()[at], 0.0)

        # Merge into the running top-k of the U latents that have candidates; empty slots stay empty.
        W = len(offsets)
        new_act = torch.zeros(len(feats), k)  # [U, k]
        new_row = torch.full((len(feats), k), -1)
        new_pos = torch.full((len(feats), k), -1)
        new_ids = torch.full((len(feats), k, W), -1)
        new_wacts = torch.zeros(len(feats), k, W)
        new_act[u, rank], new_row[u, rank], new_pos[u, rank] = a, batch.row[n, t], batch.pos[n, t]
        new_ids[u, rank], new_wacts[u, rank] = ids, w_acts
        all_act = torch.cat([self.top_act[feats], new_act], dim=1)  # [U, 2k]
        keep = all_act.topk(k, dim=1).indices  # [U, k], sorted: the last column stays the k-th best
        self.top_act[feats] = all_act.gather(1, keep)
        self.top_row[feats] = torch.cat([self.top_row[feats], new_row], dim=1).gather(1, keep)
        self.top_pos[feats] = torch.cat([self.top_pos[feats], new_pos], dim=1).gather(1, keep)
        keep_w = keep[..., None].expand(-1, -1, W)
        self.window_ids[feats] = torch.cat([self.window_ids[feats], new_ids], dim=1).gather(1, keep_w)
        self.window_acts[feats] = torch.cat([self.window_acts[feats], new_wacts], dim=1).gather(1, keep_w)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as named tensors (what `features.safetensors` holds)."""
        return {
            "density": self.count / max(self.tokens, 1),
            "max_act": self.max_act,
            "mean_act": self.act_sum / self.count.clamp_min(1),
            "top_act": self.top_act, "top_row": self.top_row, "top_pos": self.top_pos,
            "window_ids": self.window_ids, "window_acts": self.window_acts,
        }  # fmt: skip


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
