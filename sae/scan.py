"""The analysis pass over a corpus: which tokens, where their activations come from, on how many processes,
and how it resumes.

Tokens: the context batches of the whole corpus, the training rows' batches and then the held-out rows', up
to `analyze.tokens` text tokens (`all`: every batch), cut after the batch that reaches it. The cut counts text
tokens (`Contexts.mask`), which every process knows without running the model. The metrics are not made here:
they stay on held-out tokens (`sae.evaluate`).

Activations: a batch already harvested (a training batch of the in-memory harvest or the activation cache,
which both keep each batch's contexts, or a held-out batch of the evaluation just made: see `Replay`) is
encoded from its harvested activations; the model runs only for the other batches, stopped after the hooked
module.

Processes: batch i of a split belongs to rank i % world (as in training). Each rank folds its batches into
its own `FeatureStats` and saves it; rank 0 merges the ranks' statistics in rank order (`FeatureStats.merge`:
exact but for the band samples).

Resumption: every `analyze.checkpoint_every` batches, and at the end, a rank saves its statistics and the
number of the next batch to `state_dir/rank-R-of-W.safetensors` (one file, written atomically). With `resume`
it continues from there, skipping the batches it did without running the model: the result is exactly that of
an uninterrupted pass, because the band keys are hashes of the tokens, not a generator's draws.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from sae import harvest
from sae.analyze import FeatureStats
from sae.config import AnalyzeConfig, DataConfig, ModelConfig
from sae.data import Contexts, packed_contexts
from sae.files import save_tensors
from sae.model import SAE
from sae.rundir import settings_diff

Replay = Iterable[tuple[int, torch.Tensor, Contexts, torch.Tensor]]
"""Harvested batches of one split and module, in increasing batch order: (index of the batch among the split's
context batches, acts [B, D] float32, the batch's contexts [N, T], used [N, T]), as `harvest.activations`
yields them."""


def replay_in_memory(
    acts: torch.Tensor, batches: list[tuple[Contexts, torch.Tensor]], rank: int = 0, world: int = 1
) -> Replay:
    """The replay of an in-memory harvest: acts [B, D] of the batches (contexts, used) harvested whole, in
    order, from this rank's training batches (rank, rank + world, ...)."""
    start = 0
    for j, (batch, used) in enumerate(batches):
        n = int(used.sum())
        yield j * world + rank, acts[start : start + n], batch, used
        start += n


def _corpus(
    data: DataConfig, tokenizer, batch_size: int, tokens: int | None
) -> Iterator[tuple[str, int, Contexts]]:
    """(split, index of the batch in its split, contexts) of every batch analysed, in order."""
    seen = 0
    for split in ("train", "test"):
        for i, batch in enumerate(packed_contexts(data, tokenizer, split, batch_size)):
            yield split, i, batch
            seen += int(batch.mask.sum())
            if tokens is not None and seen >= tokens:
                return


def pass_settings(
    sae: SAE, module: str, model_cfg: ModelConfig, data: DataConfig, cfg: AnalyzeConfig
) -> dict:
    """What decides a pass's result, flattened: a resumed pass must have the same (the SAE by its decoder)."""
    flat = {f"analyze.{k}": v for k, v in vars(cfg).items() if k != "checkpoint_every"}
    flat |= {f"data.{k}": v for k, v in vars(data).items()}
    W = sae.W_dec.detach()
    total, norm = W.sum(dtype=torch.float64), torch.linalg.vector_norm(W, dtype=torch.float64)
    flat |= {
        "module": module,
        "model.name": model_cfg.name,
        "model.batch_size": model_cfg.batch_size,
        "model.max_norm_ratio": model_cfg.max_norm_ratio,
        "sae": [sae.d_in, sae.d_sae, round(float(total), 6), round(float(norm), 6)],
    }
    return json.loads(json.dumps(flat))


def _save(path: Path, stats: FeatureStats, next_batch: int, done: bool, settings: dict) -> None:
    meta = {"next_batch": str(next_batch), "done": str(done), "settings": json.dumps(settings)}
    save_tensors(path, stats.state(), meta)


def _load(path: Path, cfg: AnalyzeConfig, settings: dict) -> tuple[FeatureStats, int, bool]:
    """(statistics, next batch, done) saved in `path`, checked to have been made with `settings`."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    diff = settings_diff(json.loads(meta["settings"]), settings)
    if diff:
        raise ValueError(
            f"resume=true continues the analysis saved in {path}, but {diff}; restore those settings, or run "
            "without resume=true to start the analysis over"
        )
    return FeatureStats.from_state(cfg, state), int(meta["next_batch"]), meta["done"] == "True"


@torch.no_grad()
def analysis_pass(
    sae: SAE,
    model,
    tokenizer,
    module: str,
    model_cfg: ModelConfig,
    data: DataConfig,
    cfg: AnalyzeConfig,
    state_dir: Path,
    replay: Replay = (),
    rank: int = 0,
    world: int = 1,
    resume: bool = False,
    held_out: Replay = (),
) -> FeatureStats | None:
    """The feature statistics of the corpus (see the module docstring): merged on rank 0, None on the others.
    `replay` and `held_out`: harvested training and held-out batches of `module`, encoded without a forward
    (batches of other ranks among them are passed over). Leaves each rank's final state in `state_dir`, for
    the caller to remove once the analysis is written."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"rank-{rank}-of-{world}.safetensors"
    settings = pass_settings(sae, module, model_cfg, data, cfg)
    stats, start, done = FeatureStats(sae.d_sae, cfg), 0, False
    if resume and path.exists():
        stats, start, done = _load(path, cfg, settings)
    else:
        path.unlink(missing_ok=True)
    device = next(sae.parameters()).device
    harvested = {"train": iter(replay), "test": iter(held_out)}
    ahead: dict = {split: next(it, None) for split, it in harvested.items()}
    tokens = None if cfg.tokens == "all" else int(cfg.tokens)
    since, g = 0, 0
    with tqdm(desc="analysis", unit="tok", unit_scale=True, disable=rank != 0 or done) as bar:
        for g, (split, i, batch) in enumerate(_corpus(data, tokenizer, model_cfg.batch_size, tokens)):
            while ahead[split] is not None and ahead[split][0] < i:
                ahead[split] = next(harvested[split], None)
            if done or i % world != rank or g < start:
                continue
            here = ahead[split]
            if here is not None and here[0] == i:
                if not torch.equal(here[2].ids, batch.ids):
                    raise RuntimeError(
                        f"harvested {split} batch {i} holds other tokens than the corpus gives now: was it "
                        "harvested from another corpus or with other packing settings?"
                    )
                x, used = here[1], here[3]
            else:
                xs, used = harvest.capture_kept(model, [module], batch, model_cfg.max_norm_ratio)
                x = xs[module].float()
            stats.update(sae.encode(x.to(device)), used, batch)
            bar.update(len(x))
            since += 1
            if since == cfg.checkpoint_every:
                _save(path, stats, g + 1, False, settings)
                since = 0
    if not done:
        _save(path, stats, g + 1, True, settings)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    for r in range(1, world):
        other, _, _ = _load(state_dir / f"rank-{r}-of-{world}.safetensors", cfg, settings)
        stats.merge(other)
    return stats
