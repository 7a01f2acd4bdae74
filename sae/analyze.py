"""Per-feature statistics in one streaming pass with bounded memory.

For every latent, from the sparse code of each batch (B x K active latents, never the dense latents [N, T, F]):

- how often it fires (density), its max and mean activation;
- its `top_k` strongest examples, each with provenance (dataset row, position) and a context window of token
  ids with the latent's activation on each of them, at most `per_context` from one packed context (so the
  neighbouring positions of one sentence do not fill them): each batch's per-feature top-k is merged into
  the running top-k and the rest is dropped;
- examples across its activation range (Anthropic's "Towards Monosemanticity" interval samples, as in
  SAEDashboard): `intervals` equal-width bands of (0, max act] and up to `per_interval` examples per band, a
  uniform random sample of the band's tokens, with the same provenance and windows as the top examples;
- a histogram of its activations on a fixed fine grid (`HIST_BINS` bins, log-spaced; see `hist_edges`),
  re-binned at save time into equal-width bins of [0, max act] and into the bands' token counts;
- its nearest features by decoder cosine and the tokens its decoder direction promotes (logit lens), both
  from the weights alone.

Band samples (reservoir sampling by random keys, Efraimidis & Spirakis 2006 with equal weights): every live
(token, latent) triple has a key uniform in [0, 1), a hash of (seed, dataset row, position, latent) rather
than a draw from a generator, so a token's key is the same whichever process, batch order or resumed pass
meets it; each band keeps the `per_interval` largest keys of the tokens that fell in it. That is an exact uniform sample without replacement, and it costs one top-n merge
per batch like the top-k, whose candidates thin out as the bands fill (a token enters only if its key beats
the band's n-th), so windows are built for few tokens once the pass is under way.

The bands are those of the final max, which a single pass does not know in advance: they are defined on the
running max, and whenever a batch raises a feature's max, its kept samples are re-binned by their stored
activation into the new bands, each new band keeping the n largest keys of what lands in it. Where each new
band is a union of whole old bands (the max did not change, or grew by an integer factor), this is exactly the
sample of the union, so the samples are uniform in the final bands. Where a new edge splits an old band, the
samples it had kept were chosen against tokens that now lie in another band, so tokens seen before the max
last grew are sampled at slightly wrong rates until later tokens outweigh them: the samples are approximately
uniform, exactly so once the max is reached (typically early: a feature's max is a record, and records grow
rare). Every kept sample lies in its band of the final max.

The bands' token counts come from the fine histogram (the bands are not known while the tokens stream by), so
they are approximate at the fine-bin resolution (about 3.7% of the activation): the fine bin that straddles a
band edge is split in proportion to its overlap. A band's count is raised to the number of samples it holds
where that approximation falls below it.

The first `skip_positions` text positions after each context's BOS count nowhere (not in the density, the
histogram, the examples or the bands): with no context to read yet, the model's state there is a position
artefact, and features that fire on it would head the dashboard. Their tokens still show, with their acts, in
the windows of later examples.

Statistics of disjoint token sets merge (`FeatureStats.merge`: the shares of data-parallel ranks) into what one
pass over their union computes: counts, histograms, max and top-k exactly (equal acts, from repeated text, are
ordered by the tokens' keys, not by arrival; the sum of activations is float64, equal up to the order of the
additions); the band samples only approximately, for the reason the bands are
approximate in one pass: each share's samples were drawn in the bands of its own max, and where the union's
max is larger, they are re-binned as above. Every merged sample lies in its band of the final max, and a
band's samples are the largest keys among the shares' samples that fall in it. `state` / `from_state` save
and restore a pass, so it can resume.

Memory is O(F x (top_k + intervals x per_interval) x window + F x HIST_BINS), whatever the number of tokens.
"""

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.config import AnalyzeConfig
from sae.data import Contexts
from sae.files import save_tensors, write_text
from sae.model import SAE, Code

HIST_BINS = 512
"""Bins of the fine activation histogram: 64 per decade, log-spaced between 1e-4 and 1e4 (see `hist_edges`)."""
HIST_LOW, HIST_HIGH = 1e-4, 1e4
"""Range of the log-spaced fine bins: wide enough for the raw activations of any model's SAE."""
HISTOGRAM_BINS = 20
"""Equal-width bins of [0, max act] in the saved JSON histogram."""

_BAND_EMPTY = (-1.0, 0.0, -1, -1, -1, 0.0)
"""What an empty band slot holds in each of (key, act, row, pos, window ids, window acts)."""


def hist_edges() -> torch.Tensor:
    """The fine histogram's edges [HIST_BINS + 1]: bin i is [edges[i], edges[i + 1]). Log-spaced from 1e-4 to 1e4
    (64 bins per decade, each 3.7% wide), except that the first bin starts at 0 and so holds every act below
    1e-4 too, and acts at or above 1e4 are counted in the last bin."""
    edges = torch.logspace(math.log10(HIST_LOW), math.log10(HIST_HIGH), HIST_BINS + 1, dtype=torch.float64)
    edges[0] = 0.0
    return edges.float()


def band(act: torch.Tensor, max_act: torch.Tensor, n_bands: int) -> torch.Tensor:
    """The band of each act (> 0) among `n_bands` equal-width bands of (0, max_act]: band j is
    (j max / n, (j + 1) max / n]; acts and max_act broadcast."""
    return (act / max_act * n_bands).ceil().long().clamp(1, n_bands) - 1


def rebin_histogram(
    counts: torch.Tensor, edges: torch.Tensor, max_act: torch.Tensor, bins: int
) -> torch.Tensor:
    """Fine histograms counts [F, H] over `edges` [H + 1] re-binned into `bins` equal-width bins of [0, max_act]
    [F]: [F, bins] integer counts that sum to each feature's total. The cumulative count is interpolated
    linearly inside the fine bin a new edge falls in, the fine bins clipped at the max (and the last, which
    holds the acts beyond its upper edge too, stretched to it), so the counts are exact only to the fine bins'
    resolution: a new bin's count is off by at most the counts of the fine bins its two edges fall in."""
    F, H = counts.shape
    top = max_act.double()[:, None]  # [F, 1]
    E = torch.minimum(torch.cat([edges.double()[:-1], torch.tensor([math.inf])]), top)  # [F, H + 1]
    counts = counts.double()
    cum = torch.cat([torch.zeros(F, 1, dtype=torch.float64), counts.cumsum(1)], dim=1)  # [F, H + 1]
    q = top * torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # [F, bins + 1]
    i = torch.searchsorted(E, q, right=True).clamp(1, H)  # E[i - 1] <= q < E[i], but at the max
    lower, upper = E.gather(1, i - 1), E.gather(1, i)
    frac = ((q - lower) / (upper - lower)).nan_to_num(1.0).clamp(0, 1)  # 0 / 0 where the max is the edge
    cdf = cum.gather(1, i - 1) + frac * counts.gather(1, i - 1)
    return cdf.round().long().diff(dim=1)


_M31 = (1 << 31) - 1


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (two rounds of xor-shift-multiply, in int64 without overflow) of h [...] in [0, 2^31)."""
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M31
    return h ^ (h >> 16)


_MULTIPLIERS = ((0x27D4EB2F, 0x165667B1, 0x61C88647), (0x2C1B3C6D, 0x297A2D39, 0x4CF5AD43))
"""Odd multipliers below 2^31 that spread (row, position, latent) in each of the two halves of a key."""


def keys(seed: int, row: torch.Tensor, pos: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The band-sampling key of each (dataset row, position, latent) [L]: float64 uniform in [0, 1), 62 bits
    from two independent 31-bit hashes (each a multiply-add of the three then `_mix`), so distinct triples tie
    with negligible probability."""
    parts = []
    for salt, (a, b, c) in enumerate(_MULTIPLIERS, start=2 * seed + 1):
        h = ((row & _M31) * a + (pos & _M31) * b) & _M31  # each product < 2^62: no overflow
        h = (h + (f & _M31) * c + salt) & _M31
        parts.append(_mix(h).double())
    return (parts[0] * 2.0**31 + parts[1]) / 2.0**62


def _first_per_group(group: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """For items sorted by `group` [L] (best first within a group): the groups [U], and for the first n items of
    each group a mask [L] selecting them, their group's place in the groups [C] and their rank in it [C]."""
    groups, counts = group.unique_consecutive(return_counts=True)  # [U]
    start = counts.cumsum(0) - counts
    rank = torch.arange(len(group)) - start.repeat_interleave(counts)
    slot = rank < n
    u = torch.arange(len(groups)).repeat_interleave(counts)[slot]
    return groups, slot, u, rank[slot]


def _place(
    score: torch.Tensor,
    empty: float,
    rows: torch.Tensor,
    u: torch.Tensor,
    rank: torch.Tensor,
    new: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Where candidates go in a table of kept examples whose scores `score` [R, n] are in no particular order
    (`empty` in an empty slot): candidate c, scored new[c], competes for row rows[u[c]] (at most n per row,
    rank[c] among them). Each of the `rows` [U] keeps its n best of old and new, a candidate taking the slot
    of an old example it evicts. Returns (row, slot, candidate) of each write, [C'] each."""
    n = score.shape[1]
    fresh = torch.full((len(rows), n), empty, dtype=score.dtype)  # [U, n]
    fresh[u, rank] = new
    keep = torch.cat([score[rows], fresh], dim=1).topk(n, dim=1).indices  # [U, n]
    kept = torch.zeros(len(rows), 2 * n, dtype=torch.bool).scatter_(1, keep, True)
    # Each row keeps n of 2n, so as many candidates come in as old slots go: paired in row-major order.
    _, slot = (~kept[:, :n]).nonzero(as_tuple=True)
    r, j = kept[:, n:].nonzero(as_tuple=True)
    candidate = torch.full((len(rows), n), -1)
    candidate[u, rank] = torch.arange(len(u))
    c = candidate[r, j]
    real = c >= 0  # not an empty slot of `fresh` that took an empty old slot's place
    return rows[r[real]], slot[real], c[real]


def _sorted(tensors: list[torch.Tensor], by: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` [..., n, ...] with their slot dim (the last of `by` [..., n]) ordered by `by`, descending."""
    order = by.argsort(dim=-1, descending=True, stable=True)
    d = by.dim()
    return [t.gather(d - 1, order.view(*order.shape, *[1] * (t.dim() - d)).expand_as(t)) for t in tensors]


class FeatureStats:
    """Running per-feature density, max/mean activation, top-k examples, band samples across the activation
    range (each with a context window) and a fine activation histogram; see the module docstring."""

    def __init__(self, d_sae: int, cfg: AnalyzeConfig):
        self.cfg = cfg
        k, W = cfg.top_k, cfg.window_before + 1 + cfg.window_after
        nb, n = cfg.intervals, cfg.per_interval
        self.tokens = 0
        self.count = torch.zeros(d_sae, dtype=torch.long)  # [F] tokens fired on
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)  # [F]
        self.max_act = torch.zeros(d_sae)  # [F]
        self.top_act = torch.zeros(d_sae, k)  # [F, k] in no particular order (`tensors` sorts); 0: empty
        self.top_score = torch.zeros(d_sae, k, dtype=torch.float64)  # [F, k] the act, ties broken by key
        self.top_row = torch.full((d_sae, k), -1, dtype=torch.long)  # [F, k]
        self.top_pos = torch.full((d_sae, k), -1, dtype=torch.long)  # [F, k]
        self.window_ids = torch.full((d_sae, k, W), -1, dtype=torch.long)  # [F, k, W]; -1 beyond the context
        self.window_acts = torch.zeros(d_sae, k, W)  # [F, k, W]
        # Band samples: band j of (0, max_act] keeps its n largest random keys, in no particular order.
        self.interval_key = torch.full((d_sae, nb, n), -1.0, dtype=torch.float64)  # [F, I, n]; -1: empty
        self.interval_act = torch.zeros(d_sae, nb, n)  # [F, I, n]
        self.interval_row = torch.full((d_sae, nb, n), -1, dtype=torch.long)  # [F, I, n]
        self.interval_pos = torch.full((d_sae, nb, n), -1, dtype=torch.long)  # [F, I, n]
        self.interval_window_ids = torch.full((d_sae, nb, n, W), -1, dtype=torch.long)  # [F, I, n, W]
        self.interval_window_acts = torch.zeros(d_sae, nb, n, W)  # [F, I, n, W]
        self.hist_edges = hist_edges()  # [H + 1]
        self.hist_counts = torch.zeros(d_sae, HIST_BINS, dtype=torch.int32)  # [F, H]

    def _bands(self) -> list[torch.Tensor]:
        """The band samples' tensors in `_BAND_EMPTY` order, each [F, I, n, ...]."""
        return [
            self.interval_key,
            self.interval_act,
            self.interval_row,
            self.interval_pos,
            self.interval_window_ids,
            self.interval_window_acts,
        ]

    @torch.no_grad()
    def update(self, code: Code, used: torch.Tensor, batch: Contexts) -> None:
        """Folds in the sparse code of `batch`: Code([B, K], [B, K]) of the B True positions of `used` [N, T]
        in row-major order (what `harvest.activations` yields and `SAE.encode` makes of it); zero acts are
        padding, and a token's live latents are distinct.

        Never forms the dense latents [N, T, F]: only (token, latent, act) triples above their latent's
        current k-th best value can enter the top-k, only those whose random key beats their band's n-th can
        enter a band, and context windows are built for those alone.
        """
        F, k = len(self.count), self.cfg.top_k
        nb, n = self.cfg.intervals, self.cfg.per_interval
        acts, idx = code.acts.detach().float().cpu(), code.idx.cpu()  # [B, K]
        used = used.cpu()
        nt = used.nonzero()  # [B, 2] (n, t) of each token
        B = len(nt)
        if acts.shape[0] != B:
            raise ValueError(f"the code holds {acts.shape[0]} tokens but `used` marks {B} positions")
        # Positions 1..skip_positions after the BOS each packed context starts with count nowhere.
        first = self.cfg.skip_positions + 1 if self.cfg.skip_positions else 0
        self.tokens += int(batch.mask[:, first:].sum())
        live = (acts > 0) & (nt[:, 1] >= first)[:, None]
        b = torch.arange(B)[:, None].expand_as(idx)[live]  # [L] token of each live triple
        f, a = idx[live], acts[live]  # [L]
        self.count.index_add_(0, f, torch.ones_like(f))
        self.act_sum.index_add_(0, f, a.double())
        fine = torch.bucketize(a, self.hist_edges, right=True).clamp_(1, HIST_BINS) - 1  # [L]
        self.hist_counts.view(-1).index_add_(
            0, f * HIST_BINS + fine, torch.ones_like(fine, dtype=torch.int32)
        )
        max_act = self.max_act.scatter_reduce(0, f, a, "amax")
        grown = ((max_act > self.max_act) & (self.max_act > 0)).nonzero().squeeze(1)
        self.max_act = max_act
        if len(grown):
            self._rebin(grown)

        # Every live triple's random key: it samples the bands, and it breaks ties of the top-k (the same text
        # repeated gives equal acts), so which of equal examples is kept does not hang on the order they come.
        kn, kt = nt[b].T
        key = keys(self.cfg.seed, batch.row[kn, kt], batch.pos[kn, kt], f)  # [L]
        # float32 acts a < a' are at least a * 2^-24 apart, so this keeps their order and orders equal ones.
        score = a.double() * (1 + key * 2.0**-25)  # [L]

        # Top-k candidates: triples that beat their latent's k-th best so far (0 while its top-k has room),
        # grouped by latent, strongest first, at most k per latent.
        ti = (score > self.top_score.min(dim=1).values[f]).nonzero().squeeze(1)
        ti = ti[score[ti].argsort(descending=True)]
        if self.cfg.per_context:
            # At most `per_context` per (latent, context), its strongest: a context is in one batch only, so
            # this holds for the whole pass.
            group, order = (f[ti] * used.shape[0] + nt[b[ti], 0]).sort(stable=True)
            _, pick, _, _ = _first_per_group(group, self.cfg.per_context)
            ti = ti[order][pick]
            ti = ti[score[ti].argsort(descending=True, stable=True)]
        ti = ti[f[ti].argsort(stable=True)]
        feats, slot, u, rank = _first_per_group(f[ti], k)
        top_row, top_slot, c = _place(self.top_score, 0.0, feats, u, rank, score[ti][slot])
        ti = ti[slot][c]
        tb, tf, ta = b[ti], f[ti], a[ti]

        # Band candidates: triples whose key beats their band's n-th key (-1 while the band has room), grouped
        # by (latent, band), largest key first, at most n per band.
        cell = f * nb + band(a, max_act[f], nb)  # [L] (latent, band)
        over = key > self.interval_key.view(F * nb, n).min(dim=1).values[cell]
        bb, bcell, ba, bkey = b[over], cell[over], a[over], key[over]
        order = (bcell - bkey).argsort()  # by cell, then key descending: keys are in [0, 1)
        bb, bcell, ba, bkey = bb[order], bcell[order], ba[order], bkey[order]
        cells, slot, u, rank = _first_per_group(bcell, n)
        band_row, band_slot, c = _place(
            self.interval_key.view(F * nb, n), _BAND_EMPTY[0], cells, u, rank, bkey[slot]
        )
        bb, bcell, ba, bkey = bb[slot][c], bcell[slot][c], ba[slot][c], bkey[slot][c]

        if not len(tb) + len(bb):
            return
        ids, w_acts = self._windows(
            torch.cat([tb, bb]), torch.cat([tf, bcell // nb]), nt, used, batch, acts, idx
        )
        wn, wt = nt[torch.cat([tb, bb])].T
        row, pos = batch.row[wn, wt], batch.pos[wn, wt]
        top = [self.top_score, self.top_act, self.top_row, self.top_pos, self.window_ids, self.window_acts]
        C = len(tb)
        for t, v in zip(top, [score[ti], ta, row[:C], pos[:C], ids[:C], w_acts[:C]]):
            t[top_row, top_slot] = v
        for t, v in zip(self._bands(), [bkey, ba, row[C:], pos[C:], ids[C:], w_acts[C:]]):
            t.view(F * nb, n, *t.shape[3:])[band_row, band_slot] = v

    def _windows(
        self,
        b: torch.Tensor,
        f: torch.Tensor,
        nt: torch.Tensor,
        used: torch.Tensor,
        batch: Contexts,
        acts: torch.Tensor,
        idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context windows around tokens b [C] for latents f [C]: positions t - before .. t + after of the same
        context, their token ids (-1 beyond the context) and latent f's act at each [C, W]. The acts are looked
        up in the code (acts, idx [B, K]) sorted by (latent, token): the window's tokens are consecutive code
        rows, so one search finds where they start and at most W entries follow."""
        B, T = len(nt), used.shape[1]
        n, t = nt[b].T  # [C]
        offsets = torch.arange(-self.cfg.window_before, self.cfg.window_after + 1)  # [W]
        W = len(offsets)
        wt = t[:, None] + offsets  # [C, W]
        inside = (wt >= 0) & (wt < T)
        ids = torch.where(inside, batch.ids[n[:, None], wt.clamp(0, T - 1)], -1)

        live = acts > 0
        key = idx[live] * B + torch.arange(B)[:, None].expand_as(idx)[live]  # [L] latent * B + token
        key, order = key.sort()
        value = acts[live][order]
        # [N * T + 1] the code row of the first used position at or after each position
        first_row = torch.cat([torch.zeros(1, dtype=torch.long), used.flatten().cumsum(0)])
        lo = first_row[n * T + (t - self.cfg.window_before).clamp_min(0)]  # [C] first code row of the window
        hi = first_row[n * T + (t + self.cfg.window_after + 1).clamp_max(T)]  # [C] one past its last
        j = torch.searchsorted(key, f * B + lo)[:, None] + torch.arange(W)  # [C, W] candidate entries
        found = key[j.clamp_max(len(key) - 1)] - (f * B)[:, None]  # their token, if latent f's
        hit = (j < len(key)) & (found < hi[:, None])  # found >= lo by the search
        slot = torch.where(hit, nt[found.clamp(0, B - 1), 1] - t[:, None] + self.cfg.window_before, W)
        w_acts = torch.zeros(len(b), W + 1).scatter_(
            1, slot, torch.where(hit, value[j.clamp_max(len(key) - 1)], 0.0)
        )
        return ids, w_acts[:, :W]

    def _rebin(self, g: torch.Tensor) -> None:
        """Moves the band samples of latents g [G], whose max has grown, into the bands of the new max: by
        their stored act, each new band keeping the n largest keys of what lands in it (see the module
        docstring for when that is exact)."""
        binned = self._binned([t[g].flatten(1, 2) for t in self._bands()], self.max_act[g])
        for t, new in zip(self._bands(), binned):
            t[g] = new

    def _binned(self, samples: list[torch.Tensor], max_act: torch.Tensor) -> list[torch.Tensor]:
        """Band samples [G, S, ...] (`_BAND_EMPTY` order; an empty one has act 0) sorted into the bands of
        max_act [G]: each band keeps the n largest keys of the samples its act puts in it; [G, I, n, ...]."""
        nb, n = self.cfg.intervals, self.cfg.per_interval
        key, act = samples[0], samples[1]
        G, S = act.shape
        new_band = torch.where(act > 0, band(act, max_act[:, None], nb), nb)  # [G, S]; nb: empty
        order = (new_band - key).argsort(dim=1)  # by band, then key descending
        new_band = new_band.gather(1, order)
        rank = torch.arange(S) - torch.searchsorted(new_band, new_band)  # rank within the band
        gi, j = ((new_band < nb) & (rank < n)).nonzero(as_tuple=True)
        dest, src = new_band[gi, j] * n + rank[gi, j], order[gi, j]
        out = []
        for t_old, e in zip(samples, _BAND_EMPTY):
            t_new = torch.full((G, nb * n, *t_old.shape[2:]), e, dtype=t_old.dtype)
            t_new[gi, dest] = t_old[gi, src]
            out.append(t_new.view(G, nb, n, *t_old.shape[2:]))
        return out

    _STATE = (
        "count",
        "act_sum",
        "max_act",
        "top_score",
        "top_act",
        "top_row",
        "top_pos",
        "window_ids",
        "window_acts",
        "interval_key",
        "interval_act",
        "interval_row",
        "interval_pos",
        "interval_window_ids",
        "interval_window_acts",
        "hist_counts",
    )
    """The tensors that make up a pass's state, besides the token count."""

    def state(self) -> dict[str, torch.Tensor]:
        """Everything the pass has accumulated, as named tensors: `from_state` continues from it exactly."""
        return {name: getattr(self, name) for name in self._STATE} | {"tokens": torch.tensor(self.tokens)}

    @classmethod
    def from_state(cls, cfg: AnalyzeConfig, state: dict[str, torch.Tensor]) -> "FeatureStats":
        """The pass `state` (from `state`, with the same `cfg`) was saved from."""
        stats = cls(len(state["count"]), cfg)
        for name in cls._STATE:
            mine = getattr(stats, name)
            if state[name].shape != mine.shape or state[name].dtype != mine.dtype:
                raise ValueError(
                    f"analysis state {name} is {tuple(state[name].shape)} {state[name].dtype}, not "
                    f"{tuple(mine.shape)} {mine.dtype} as these analyze settings make it"
                )
            setattr(stats, name, state[name].clone())
        stats.tokens = int(state["tokens"])
        return stats

    def merge(self, other: "FeatureStats") -> None:
        """Folds in `other`, the statistics of other tokens (another rank's share of a corpus): what one pass
        over both would hold, exactly but for the band samples and float64 rounding (module docstring)."""
        self.tokens += other.tokens
        self.count += other.count
        self.act_sum += other.act_sum
        self.hist_counts += other.hist_counts
        self.max_act = torch.maximum(self.max_act, other.max_act)
        k = self.cfg.top_k
        names = ("top_score", "top_act", "top_row", "top_pos", "window_ids", "window_acts")
        both = [torch.cat([getattr(self, a), getattr(other, a)], dim=1) for a in names]  # [F, 2k, ...]
        for name, t in zip(names, _sorted(both, both[0])):
            setattr(self, name, t[:, :k].clone())
        both = [
            torch.cat([a.flatten(1, 2), b.flatten(1, 2)], dim=1)
            for a, b in zip(self._bands(), other._bands())
        ]
        binned = self._binned(both, self.max_act)
        for name, t in zip(self._STATE[9:15], binned):
            setattr(self, name, t)

    def interval_count(self) -> torch.Tensor:
        """Tokens per band [F, I], from the fine histogram (approximate, see the module docstring), at least
        the samples each band holds."""
        count = rebin_histogram(self.hist_counts, self.hist_edges, self.max_act, self.cfg.intervals)
        return torch.maximum(count, (self.interval_act > 0).sum(dim=2))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as named tensors (what `features.safetensors` holds): the top examples strongest
        first, and each band's samples too; empty slots last."""
        top = [self.top_act, self.top_row, self.top_pos, self.window_ids, self.window_acts]
        return {
            "density": self.count.float() / max(self.tokens, 1),
            "max_act": self.max_act,
            "mean_act": (self.act_sum / self.count.clamp_min(1)).float(),
            **dict(
                zip(
                    ("top_act", "top_row", "top_pos", "window_ids", "window_acts"),
                    _sorted(top, self.top_score),
                )
            ),
            **dict(
                zip(
                    (
                        "interval_act",
                        "interval_row",
                        "interval_pos",
                        "interval_window_ids",
                        "interval_window_acts",
                    ),
                    _sorted(self._bands()[1:], self.interval_act),
                )
            ),
            "interval_count": self.interval_count(),
            "hist_counts": self.hist_counts,
            "hist_edges": self.hist_edges,
        }


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


@torch.no_grad()
def nearest_features(sae: SAE, n: int = 8, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's n nearest other features by cosine of their decoder directions: (cos, ids), each [F, n]
    on the CPU, most similar first. Computed `chunk` rows at a time ([chunk, F]), on the SAE's device."""
    W = sae.W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [F, D]
    n = min(n, len(W) - 1)
    cos, ids = [], []
    for start in range(0, len(W), chunk):
        c = W[start : start + chunk] @ W.T  # [chunk, F]
        rows = torch.arange(len(c), device=c.device)
        c[rows, rows + start] = -math.inf  # not itself
        top = c.topk(n, dim=1)
        cos.append(top.values.cpu())
        ids.append(top.indices.cpu())
    return torch.cat(cos), torch.cat(ids)


def token_strings(tokenizer) -> list[str]:
    """The decoded text of every token id, indexed by id."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def _examples(
    act: torch.Tensor,
    row: torch.Tensor,
    pos: torch.Tensor,
    ids: torch.Tensor,
    acts: torch.Tensor,
    before: int,
    vocab: list[str],
) -> list:
    """Example slots (act, row, pos) [..., S] with windows (ids, acts) [..., S, W], live slots (act > 0) first,
    as nested lists of JSON example dicts, one list of the live slots per row of the leading dims. A window's
    tokens beyond the context (-1) form a prefix and a suffix, which are cut."""
    live = act > 0  # [..., S]
    per_row = live.sum(-1).flatten().tolist()
    ids, acts = ids[live], acts[live]  # [M, W]
    start = (ids[:, :before] < 0).sum(1).tolist()
    stop = (ids.shape[1] - (ids[:, before + 1 :] < 0).sum(1)).tolist()
    tokens = np.asarray(vocab, dtype=object)[ids.numpy()].tolist()  # -1 picks the last, cut below
    examples = iter(
        [
            {"act": a, "row": r, "pos": p, "tokens": t[i:j], "acts": x[i:j], "center": before - i}
            for a, r, p, t, x, i, j in zip(
                act[live].double().round(decimals=4).tolist(),
                row[live].tolist(),
                pos[live].tolist(),
                tokens,
                acts.double().round(decimals=3).numpy().tolist(),
                start,
                stop,
            )
        ]
    )
    rows: list = [list(itertools.islice(examples, m)) for m in per_row]
    for d in reversed(act.shape[1:-1]):
        rows = [rows[i : i + d] for i in range(0, len(rows), d)]
    return rows


def save_analysis(
    stats: FeatureStats,
    run_dir: str | Path,
    tokenizer,
    meta: dict,
    lens: tuple[torch.Tensor, ...] | None = None,
    nearest: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Writes `analysis/features.safetensors` and `analysis/features.json` (the dashboard's input). `lens`:
    from `logit_lens`; `nearest`: (cos, ids) from `nearest_features`.

    features.json: `meta` with `n_tokens`, `window` [before, after] and `intervals` (the number of bands), and
    `features`, one dict per feature: id, density, max_act, mean_act, examples (the top ones, strongest first,
    each {act, row, pos, tokens, acts, center}: the window cut to the context, `center` the activating token's
    place in it), intervals ([{lo, hi, count, examples}] per band, increasing), histogram ({edges [21],
    counts [20]} over [0, max_act]), and, when given, top_logits / bottom_logits ([[token, logit]]) and
    nearest ([[feature id, cosine]]).
    """
    out = Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    tensors = stats.tensors()
    if lens is not None:
        tensors |= dict(zip(("top_logit", "top_logit_id", "bottom_logit", "bottom_logit_id"), lens))
    if nearest is not None:
        tensors |= {"nearest_cos": nearest[0], "nearest_id": nearest[1]}
    save_tensors(out / "features.safetensors", tensors)

    vocab = token_strings(tokenizer)
    before, nb = stats.cfg.window_before, stats.cfg.intervals
    top = _examples(
        tensors["top_act"],
        tensors["top_row"],
        tensors["top_pos"],
        tensors["window_ids"],
        tensors["window_acts"],
        before,
        vocab,
    )
    bands = _examples(
        tensors["interval_act"],
        tensors["interval_row"],
        tensors["interval_pos"],
        tensors["interval_window_ids"],
        tensors["interval_window_acts"],
        before,
        vocab,
    )
    max_act = tensors["max_act"].double()
    band_edges = (max_act[:, None] * torch.arange(nb + 1) / nb).round(decimals=4).tolist()  # [F, I + 1]
    band_count = tensors["interval_count"].tolist()
    bins = torch.arange(HISTOGRAM_BINS + 1) / HISTOGRAM_BINS
    coarse_edges = (max_act[:, None] * bins).round(decimals=4).tolist()  # [F, 21]
    coarse_counts = rebin_histogram(
        stats.hist_counts, stats.hist_edges, stats.max_act, HISTOGRAM_BINS
    ).tolist()
    density = tensors["density"].tolist()
    max_r, mean_r = (tensors[key].double().round(decimals=4).tolist() for key in ("max_act", "mean_act"))
    if lens is not None:
        lens_v = [lens[0].double().round(decimals=3).tolist(), lens[2].double().round(decimals=3).tolist()]
        lens_i = [lens[1].tolist(), lens[3].tolist()]
    if nearest is not None:
        near_cos, near_id = nearest[0].double().round(decimals=3).tolist(), nearest[1].tolist()
    features = []
    for f in range(len(density)):
        edges = band_edges[f]
        feature: dict[str, Any] = {
            "id": f,
            "density": density[f],
            "max_act": max_r[f],
            "mean_act": mean_r[f],
            "examples": top[f],
            "intervals": [
                {"lo": edges[j], "hi": edges[j + 1], "count": band_count[f][j], "examples": bands[f][j]}
                for j in range(nb)
            ],
            "histogram": {"edges": coarse_edges[f], "counts": coarse_counts[f]},
        }
        if lens is not None:
            feature["top_logits"] = [[vocab[i], v] for v, i in zip(lens_v[0][f], lens_i[0][f])]
            feature["bottom_logits"] = [[vocab[i], v] for v, i in zip(lens_v[1][f], lens_i[1][f])]
        if nearest is not None:
            feature["nearest"] = [[i, c] for c, i in zip(near_cos[f], near_id[f])]
        features.append(feature)
    meta = meta | {
        "n_tokens": stats.tokens,
        "window": [stats.cfg.window_before, stats.cfg.window_after],
        "intervals": nb,
    }
    write_text(out / "features.json", json.dumps(meta | {"features": features}, separators=(",", ":")))
    return out
