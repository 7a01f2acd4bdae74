"""The jobs behind the entry scripts: harvest -> train -> evaluate -> analyze -> dashboard.

A run directory is assembled in `<run_dir>.tmp` and renamed into place at the end, so a failed or
interrupted job never leaves a half-written run directory behind. Everything that can be wrong with the
input (model, module, data, sizes) is checked before the long work starts.
"""

import dataclasses
import datetime
import functools
import itertools
import json
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae import analyze as an
from sae import devices, formats, harvest, site, stream
from sae.cache import write_cache
from sae.checkpoint import find_checkpoint
from sae.config import (
    AnalyzeConfig,
    AnalyzeJob,
    DataConfig,
    ModelConfig,
    SAEConfig,
    TrainJob,
    from_dict,
    sae_variants,
)
from sae.data import Contexts, packed_contexts
from sae.files import read_json, write_json
from sae.metrics import dead_fraction, firing_counts, spliced_losses
from sae.model import SAE
from sae.train import Interrupted, TrainingDiverged, train


def _check_width(sae: SAEConfig, d_in: int) -> None:
    d_sae = sae.expansion_factor * d_in
    if sae.k >= d_sae:
        raise ValueError(
            f"sae.k={sae.k} must be smaller than the number of latents d_sae={d_sae} "
            f"(sae.expansion_factor={sae.expansion_factor} x d_in={d_in})"
        )


def harvest_in_memory(
    model, module: str, contexts: Iterator[Contexts], max_tokens: int, max_norm_ratio: float
) -> torch.Tensor:
    """Harvests up to `max_tokens` activations into one [B, D] tensor (fewer if the data runs out)."""
    chunks, total = [], 0
    with tqdm(total=max_tokens, desc="harvest", unit="tok", unit_scale=True) as bar:
        for x, _, _ in harvest.activations(model, module, contexts, max_tokens, max_norm_ratio):
            x = x[: max_tokens - total].cpu()
            chunks.append(x)
            total += len(x)
            bar.update(len(x))
    return torch.cat(chunks)


def _locked(fn: Callable, lock: threading.Lock) -> Callable:
    """`fn` called holding `lock`."""

    def call(*args, **kwargs):
        with lock:
            return fn(*args, **kwargs)

    return call


def _train_contexts(cfg: TrainJob, tokenizer, rank: int = 0, world: int = 1) -> Iterator[Contexts]:
    """The training context batches of this rank: every world-th batch from the rank-th on."""
    contexts = packed_contexts(cfg.data, tokenizer, "train", cfg.model.batch_size)
    return itertools.islice(contexts, rank, None, world) if world > 1 else contexts


def _streamed(cfg: TrainJob, model, tokenizer, module: str, lock: threading.Lock, rank: int = 0,
              world: int = 1) -> stream.Shuffled:  # fmt: skip
    """Activations harvested on the fly through the shuffle buffer, passing over the corpus (this rank's
    share of it) repeatedly; resumable. The source's position is the count of context batches consumed: a
    resumed stream skips that many without running the model (reading at most two passes to do so).

    Each forward holds `lock`: the stream is produced in a background thread (`stream.prefetch`), and
    forward hooks are per module, not per thread, so another forward of the model (the in-training
    evaluation) must not run at the same time."""
    g = torch.Generator().manual_seed(cfg.train.seed + rank)

    def chunks(start: int) -> Iterator[torch.Tensor]:
        seen, per_pass = 0, 0
        for _ in itertools.count():
            if per_pass and seen + per_pass <= start:  # a whole pass to skip: no need to read it
                seen += (start - seen) // per_pass * per_pass
            count = 0
            for batch in _train_contexts(cfg, tokenizer, rank, world):
                seen += 1
                count += 1
                if seen <= start:
                    continue
                with lock:
                    x, _, _ = next(
                        harvest.activations(model, module, [batch], None, cfg.model.max_norm_ratio)
                    )
                yield x
            per_pass = count

    return stream.Shuffled(chunks, cfg.train.buffer_tokens, cfg.train.batch_size // world, g)


@torch.no_grad()
def held_out_pass(sae: SAE, model, tokenizer, module: str, model_cfg: ModelConfig, data: DataConfig, tokens: int,
                  stats: an.FeatureStats | None) -> dict:  # fmt: skip
    """One pass over held-out tokens: FVU, L0 and dead fraction, and (with `stats`) the feature analysis."""
    device = next(sae.parameters()).device
    sq_err = sum_x2 = l0_sum = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    n = text_tokens = 0
    counts = torch.zeros(sae.d_sae, device=device)
    contexts = packed_contexts(data, tokenizer, "test", model_cfg.batch_size)
    with tqdm(total=tokens, desc="held-out", unit="tok", unit_scale=True) as bar:
        for x, batch, used in harvest.activations(model, module, contexts, tokens, model_cfg.max_norm_ratio):
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
            if stats is not None:
                stats.update(code, used, batch)
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
def loss_recovered(reconstruct: Callable[[torch.Tensor], torch.Tensor], model, tokenizer, module: str,
                   model_cfg: ModelConfig, data: DataConfig, n_contexts: int, progress: bool = True) -> dict:  # fmt: skip
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


def _wandb_run(cfg: TrainJob, run_dir: Path, run_id: str | None = None):
    """The W&B run of one SAE; `run_id` continues the run a resumed checkpoint was logged to."""
    import wandb

    return wandb.init(
        mode=cfg.wandb.mode,  # type: ignore[arg-type]  # checked against WANDB_MODES in config.py
        project=cfg.wandb.project, entity=cfg.wandb.entity,
        name=cfg.wandb.name or Path(cfg.run_dir).name, dir=str(run_dir), config=dataclasses.asdict(cfg),
        id=run_id, resume="allow" if run_id else None,
        settings=wandb.Settings(quiet=True),  # its closing hints name the temporary directory; ours follow
    )  # fmt: skip


class _NoRun:
    """Stands in for the W&B run on ranks other than 0, which log nothing."""

    id = None
    summary: dict = {}

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _logger(run):
    """Logs to W&B (1-D tensors as histograms) and prints evaluation results to the console."""
    import wandb

    def log(metrics: dict, step: int) -> None:
        run.log({k: wandb.Histogram(v.tolist()) if torch.is_tensor(v) else v for k, v in metrics.items()},
                step=step)  # fmt: skip
        shown = {k.split("/")[-1]: v for k, v in metrics.items() if not torch.is_tensor(v)}
        tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    return log


def harvest_modules(model, modules: list[str], contexts: Iterator[Contexts], max_tokens: int,
                    max_norm_ratio: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """Harvests up to `max_tokens` activations [B, D] of each module, all from the same forward passes."""
    if len(modules) == 1:
        return {modules[0]: harvest_in_memory(model, modules[0], contexts, max_tokens, max_norm_ratio)}
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    total = 0
    with tqdm(total=max_tokens, desc="harvest", unit="tok", unit_scale=True) as bar:
        for batch in contexts:
            acts = harvest.capture(model, modules, batch.ids)
            for m in modules:
                x = acts[m][batch.mask.to(acts[m].device)].float()
                chunks[m].append(x[harvest.keep_rows(x, max_norm_ratio)].cpu())
            n = int(batch.mask.sum())
            total += n
            bar.update(n)
            if total >= max_tokens:
                break
    return {m: torch.cat(c)[:max_tokens] for m, c in chunks.items()}


def peak_memory() -> dict[str, float]:
    """Peak memory of this process so far, in GiB: host RSS, and CUDA memory where CUDA was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_gb": round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}
    if torch.cuda.is_initialized():
        peak["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return peak


def _cache_provenance(cfg: TrainJob) -> dict:
    """What changes the cached activations besides the modules, the model's dtype and the harvest settings
    `write_cache` adds itself. `model.batch_size` counts: `keep_rows` compares norms within a batch."""
    data = ("path", "name", "split", "text_column", "context_size", "holdout_every")
    return {"model": cfg.model.name, "gguf_file": cfg.model.gguf_file, "batch_size": cfg.model.batch_size,
            "data": {key: getattr(cfg.data, key) for key in data}}  # fmt: skip


def _train_one(cfg: TrainJob, sae_cfg: SAEConfig, model, tokenizer, module: str, d_in: int,
               batches: Iterator[torch.Tensor], out_dir: Path, final_dir: Path, start: float,
               lock: threading.Lock, rank: int = 0, world: int = 1) -> dict:  # fmt: skip
    """Trains one SAE on `batches`, evaluates and analyses it, and writes its run directory `out_dir`
    (continuing from the checkpoint in it with `cfg.resume`).

    `batches` are made in a background thread while the SAE trains; when streamed, up to half a shuffle
    buffer ahead, so the forwards that refill the buffer overlap training. Model forwards hold `lock`.
    Data-parallel ranks other than 0 only train, and return {}."""
    device = devices.resolve_device(cfg.model.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    job = dataclasses.replace(cfg, sae=sae_cfg, saes=[], run_dir=str(final_dir), resume=False)
    checkpoint = out_dir / "checkpoint"
    found = find_checkpoint(checkpoint) if cfg.resume else None
    settings = _training_settings(job)
    saved = read_json(found / "state.json", "checkpoint state") if found else {}
    if found and "settings" in saved:
        diff = _settings_diff(saved["settings"], settings)
        if diff:
            raise ValueError(
                f"resume=true continues the run in {found} with the settings it started with, but {diff}; "
                "restore them, or delete the unfinished run to start over with the new ones"
            )
    run_id = saved.get("wandb_id")
    run = _wandb_run(job, out_dir, run_id) if rank == 0 else _NoRun()
    evaluate = None
    if cfg.eval.train_loss_contexts and rank == 0:
        loss = functools.partial(loss_recovered, model=model, tokenizer=tokenizer, module=module,
                                 model_cfg=cfg.model, data=cfg.data, n_contexts=cfg.eval.train_loss_contexts,
                                 progress=False)  # fmt: skip
        evaluate = _locked(loss, lock)
    local_batch = cfg.train.batch_size // world
    depth = 2 if cfg.train.in_memory else max(2, cfg.train.buffer_tokens // 2 // local_batch)
    ahead = stream.prefetch(batches, depth)
    exit_code = 0
    try:
        try:
            sae = train(sae_cfg, cfg.train, ahead, log=_logger(run) if rank == 0 else lambda m, s: None,
                        checkpoint_dir=checkpoint, device=device, evaluate=evaluate, resume=cfg.resume,
                        extra_state={"settings": settings} | ({"wandb_id": run.id} if run.id else {}))  # fmt: skip
        finally:
            ahead.close()  # stops the producer before this thread runs the model
        if rank != 0:
            return {}
        trained = {f"{k}_harvest_train": v for k, v in peak_memory().items()}  # before evaluation's own peak
        stats = an.FeatureStats(sae.d_sae, cfg.analyze) if cfg.do_analyze else None
        tokens = max(cfg.eval.tokens, cfg.analyze.tokens if cfg.do_analyze else 0)
        metrics = held_out_pass(sae, model, tokenizer, module, cfg.model, cfg.data, tokens, stats)
        if cfg.eval.loss_contexts:
            metrics |= loss_recovered(lambda x: sae(x.to(device)).x_hat, model, tokenizer, module, cfg.model,
                                      cfg.data, cfg.eval.loss_contexts)  # fmt: skip
        metrics |= trained | peak_memory()
        metrics["wall_seconds"] = round(time.time() - start, 1)
        run.summary.update({f"eval/{k}": v for k, v in metrics.items()})
        meta = {"model": cfg.model.name, "hook": module, "d_in": d_in}
        sae.save(out_dir, extra=meta | {"data": cfg.data.path, "context_size": cfg.data.context_size})
        write_json(out_dir / "run.json", dataclasses.asdict(job))
        write_json(out_dir / "metrics.json", metrics)
        if stats is not None:
            write_analysis(stats, sae, model, tokenizer, cfg.analyze, out_dir, meta)
        formats.log_artifacts(run, out_dir)  # W&B copies the files now, before out_dir is renamed
    except Interrupted:
        exit_code = 1  # W&B marks the run as stopped, and continues it on resume
        raise
    finally:
        run.finish(exit_code=exit_code)
    return metrics


def _training_settings(job: TrainJob) -> dict:
    """What decides a run's training, flattened (`train.lr`: value): model, data, SAE and training settings.
    A resumed run must have the same; evaluation, analysis and logging settings may change."""
    flat = {}
    for group in ("model", "data", "sae", "train"):
        for key, value in dataclasses.asdict(getattr(job, group)).items():
            flat[f"{group}.{key}"] = list(value) if isinstance(value, tuple) else value
    # log_every stays: the dead latents AuxK uses are refreshed at log steps.
    for key in ("train.eval_every", "train.checkpoint_every", "model.device"):
        flat.pop(key)
    return flat


def _settings_diff(before: dict, now: dict) -> str:
    """The `_training_settings` that differ, as "key: before -> now, ..." ("" when none)."""
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)


def _distributed(cfg: TrainJob) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes in the environment (NCCL when the
    model runs on CUDA, each rank on its own GPU; gloo on the CPU), or (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must divide evenly among the "
            f"{world} data-parallel processes; use a multiple of {world}"
        )
    if not dist.is_initialized():
        cuda = devices.resolve_device(cfg.model.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks other than 0 wait in a collective while rank 0 alone evaluates and analyses an SAE of a `saes`
        # list; the default timeout (10 min for NCCL) is shorter than that can take.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), world


def _share(tokens: int, world: int) -> int:
    """One data-parallel rank's share of `tokens` (rounded up)."""
    return -(-tokens // world)


def _same_finished_run(cfg: TrainJob, variants: list[SAEConfig], final: Path) -> bool:
    """Whether `final` holds a finished run of every SAE of `cfg`, with the same training settings."""
    if not (final / "metrics.json").exists():
        return False
    for v in variants:
        run_json = (final if len(variants) == 1 else final / v.name) / "run.json"
        if not run_json.exists():
            return False
        try:
            done = from_dict(TrainJob, json.loads(run_json.read_text()))
        except (ValueError, TypeError):
            return False
        if _settings_diff(
            _training_settings(done), _training_settings(dataclasses.replace(cfg, sae=v, saes=[]))
        ):
            return False
    return True


def _finished(out_dir: Path, analyzed: bool) -> bool:
    """Whether the SAE in `out_dir` was evaluated (and analysed, with `analyzed`) to the end."""
    return (out_dir / "metrics.json").exists() and (
        not analyzed or (out_dir / "dashboard" / "index.html").exists()
    )


def _interrupted_checkpoint(tmp: Path) -> Path | None:
    """The checkpoint an interrupted run left in its temporary directory `tmp`, if any: that of an SAE not
    finished, else any."""
    found = [c for c in map(find_checkpoint, [tmp / "checkpoint", *sorted(tmp.glob("*/checkpoint"))]) if c]
    unfinished = [c for c in found if not (c.parent / "metrics.json").exists()]
    return (unfinished or found)[0] if found else None


def _prepare_tmp(cfg: TrainJob, tmp: Path) -> None:
    """Clears `tmp` for a fresh run, or keeps it for `cfg.resume`; refuses to discard a resumable run."""
    waiting = _interrupted_checkpoint(tmp) if tmp.exists() else None
    if waiting is not None and not cfg.resume:
        step = read_json(waiting / "state.json", "checkpoint state").get("step", "?")
        raise ValueError(
            f"{tmp} holds an unfinished run of run_dir={cfg.run_dir!r}, checkpointed at step {step}: pass "
            f"resume=true to continue it, or delete {tmp} to start over"
        )
    if waiting is None:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)


def run_training(cfg: TrainJob) -> dict:
    """Harvest once, then train, evaluate on held-out rows and (if `do_analyze`) analyze each SAE of the job;
    returns the metrics (for several SAEs, keyed by each one's directory name).

    With `cfg.resume`, SAEs finished before the interruption are kept, the interrupted one continues from
    its checkpoint, and the rest train as usual. Under torchrun each rank harvests its own share of the
    context batches and trains with cfg.train.batch_size / world tokens a step; rank 0 writes the run."""
    start = time.time()
    rank, world = _distributed(cfg)
    variants = sae_variants(cfg)
    final = Path(cfg.run_dir)
    tmp = final.with_name(final.name + ".tmp")
    if cfg.resume and not tmp.exists() and _same_finished_run(cfg, variants, final):
        print(f"run_dir={cfg.run_dir!r} is finished with these settings: nothing to resume")
        return json.loads((final / "metrics.json").read_text())
    model, tokenizer = harvest.load_model(cfg.model)
    default = harvest.resolve_module(model, cfg.model)
    modules = [harvest.resolve_module(model, dataclasses.replace(cfg.model, module=v.hook)) if v.hook
               else default for v in variants]  # fmt: skip
    if len(variants) > 1 and not cfg.train.in_memory and not cfg.train.cache_dir:
        raise ValueError(
            f"{len(variants)} SAEs in `saes` need train.in_memory=true or a train.cache_dir (one harvest "
            "shared by all)"
        )
    local_batch = cfg.train.batch_size // world
    if not cfg.train.in_memory and cfg.train.buffer_tokens < 2 * local_batch:
        raise ValueError(
            f"train.buffer_tokens={cfg.train.buffer_tokens} must be at least twice train.batch_size="
            f"{cfg.train.batch_size}{f' / {world} processes' if world > 1 else ''} when streaming "
            "(train.in_memory=false): the shuffle buffer emits half of itself at a time"
        )
    train_contexts = _train_contexts(cfg, tokenizer, rank, world)
    first = next(train_contexts, None)  # fails now on a bad corpus, before any long work
    if first is None:
        raise ValueError(
            f"data.path={cfg.data.path!r} gives rank {rank} of {world} data-parallel processes no context "
            "batch: use fewer processes or more data"
        )
    widths = {m: x.shape[-1] for m, x in harvest.capture(model, sorted(set(modules)), first.ids[:1]).items()}
    for v, m in zip(variants, modules):
        _check_width(v, widths[m])
    contexts = itertools.chain([first], train_contexts)
    cache = None
    if cfg.train.cache_dir:  # before the run directory: a cache of other settings fails here
        # Data-parallel ranks all call it on the whole corpus: the first to take the cache's file lock
        # harvests, the others wait on the lock (not a collective, which would time out) and then reuse it,
        # so the cache is the one a single process would write.
        whole = (
            contexts if world == 1 else packed_contexts(cfg.data, tokenizer, "train", cfg.model.batch_size)
        )
        cache = write_cache(cfg.train.cache_dir, model, sorted(set(modules)), whole, cfg.train.harvest_tokens,
                            cfg.model.max_norm_ratio, _cache_provenance(cfg))  # fmt: skip

    if rank == 0:
        _prepare_tmp(cfg, tmp)
    if world > 1:
        dist.barrier()
    try:
        lock = threading.Lock()
        out_dirs = [(tmp, final) if len(variants) == 1 else (tmp / v.name, final / v.name) for v in variants]
        results = {}
        for v, (out_dir, _) in zip(variants, out_dirs):
            if cfg.resume and _finished(out_dir, cfg.do_analyze):  # before the interruption
                results[v.name] = json.loads((out_dir / "metrics.json").read_text())
        pending = sorted({m for v, m in zip(variants, modules) if v.name not in results})
        if cfg.train.in_memory and cache is not None:
            # Each rank keeps every W-th token (a copy, so the whole cache is freed).
            xs = {m: cache.load(m)[rank::world].clone() if world > 1 else cache.load(m) for m in pending}
        elif cfg.train.in_memory and pending:
            # All modules, as the first attempt harvested them: the same tokens whichever SAEs are left.
            xs = harvest_modules(model, sorted(set(modules)), contexts, _share(cfg.train.harvest_tokens, world),
                                 cfg.model.max_norm_ratio)  # fmt: skip
        for v, m, (out_dir, final_dir) in zip(variants, modules, out_dirs):
            if v.name in results:
                continue
            g = torch.Generator().manual_seed(cfg.train.seed + rank)
            batches: Iterator[torch.Tensor]
            if cfg.train.in_memory:
                batches = stream.epochs(xs[m], local_batch, _share(cfg.train.tokens, world), g)
            elif cache is not None:
                batches = cache.batches(m, local_batch, _share(cfg.train.tokens, world), g,
                                        cfg.train.buffer_tokens, shard=(rank, world))  # fmt: skip
            else:
                batches = _streamed(cfg, model, tokenizer, m, lock, rank, world)
            results[v.name] = _train_one(
                cfg, v, model, tokenizer, m, widths[m], batches, out_dir, final_dir, start, lock, rank, world
            )
        if rank != 0:
            return {}
        if len(variants) > 1:
            write_json(tmp / "metrics.json", results)
        _replace_dir(tmp, final)
        for offline in sorted(final.glob("**/wandb/offline-run-*")):
            print(f"W&B offline run: upload it with `wandb sync {offline}`")
    except TrainingDiverged as e:
        if rank != 0:
            raise
        if e.checkpoint is None or not e.checkpoint.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The run is lost, its last good checkpoint is not: it moves out before the rest is removed.
        kept = final.with_name(final.name + ".last-good-checkpoint") / e.checkpoint.parent.relative_to(tmp)
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(e.checkpoint, kept)
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingDiverged(str(e).replace(str(e.checkpoint), str(kept)), kept) from None
    except BaseException as e:
        # Whatever stopped the run (a signal, a crash, a second Ctrl-C), a checkpoint it reached stays for
        # resume=true; a run that reached none leaves nothing behind.
        waiting = _interrupted_checkpoint(tmp) if rank == 0 else None
        if rank == 0 and waiting is None:
            shutil.rmtree(tmp, ignore_errors=True)
        elif waiting is not None and not isinstance(e, Interrupted):
            print(f"{tmp} keeps its checkpoint {waiting}: run again with resume=true to continue from it",
                  file=sys.stderr)  # fmt: skip
        raise
    peak = results[variants[0].name]
    print(f"peak memory of harvest + training: host {peak['peak_rss_gb_harvest_train']:.2f} GiB RSS"
          + (f", cuda {peak['peak_cuda_gb_harvest_train']:.2f} GiB" if "peak_cuda_gb_harvest_train" in peak else "")
          + f"; of the whole run: host {peak_memory()['peak_rss_gb']:.2f} GiB")  # fmt: skip
    return results[variants[0].name] if len(variants) == 1 else results


def run_analysis(job: AnalyzeJob) -> Path:
    """Re-analyzes a finished run directory (with its recorded model, hook and corpus), or a SAELens SAE
    (`job.sae_dir`, on `job.model`) into `job.run_dir`, into a dashboard."""
    run_dir = Path(job.run_dir)
    if job.sae_dir:
        imported, meta = formats.from_saelens(job.sae_dir)
        hook = job.model.module or formats.module_for_hook(meta["hook_name"], meta["hf_hook_name"])
        context = meta["context_size"] or DataConfig.context_size
        data = DataConfig(path=job.data_path or DataConfig.path, context_size=context)
        cfg = TrainJob(model=dataclasses.replace(job.model, module=hook), data=data)
    elif not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"run_dir={job.run_dir!r} holds no run.json: is it a finished training run?")
    else:
        cfg = from_dict(TrainJob, json.loads((run_dir / "run.json").read_text()))
    data = dataclasses.replace(cfg.data, path=job.data_path) if job.data_path else cfg.data
    model, tokenizer = harvest.load_model(cfg.model)
    # One SAE of several from one harvest may read another module than the job's default (`saes` hook).
    sub_run = not job.sae_dir and cfg.sae.hook
    module = harvest.resolve_module(
        model, dataclasses.replace(cfg.model, module=cfg.sae.hook) if sub_run else cfg.model
    )
    device = devices.resolve_device(cfg.model.device)
    sae = (imported.to(device) if job.sae_dir else SAE.load(run_dir, device=device)).eval()
    width = harvest.capture(model, [module], torch.zeros(1, 1, dtype=torch.long))[module].shape[-1]
    if width != sae.d_in:
        hint = (f"its cfg.json names model {meta['model_name']!r}" if job.sae_dir
                else "analyse it with the model and module it was trained on")  # fmt: skip
        raise ValueError(f"the SAE in {job.sae_dir or run_dir} reads d_in={sae.d_in}, but {module} of model.name="
                         f"{cfg.model.name!r} has width {width}; {hint}")  # fmt: skip
    stats = an.FeatureStats(sae.d_sae, job.analyze)
    held_out_pass(sae, model, tokenizer, module, cfg.model, data, job.analyze.tokens, stats)
    meta = {"model": cfg.model.name, "hook": module, "d_in": sae.d_in}
    return write_analysis(stats, sae, model, tokenizer, job.analyze, run_dir, meta)


def write_analysis(stats: an.FeatureStats, sae: SAE, model, tokenizer, cfg: AnalyzeConfig, run_dir: Path,
                   meta: dict) -> Path:  # fmt: skip
    """Adds the logit lens and nearest features to the statistics of a finished pass, writes `analysis/`
    and builds the dashboard site; returns the site's directory."""
    lens = an.logit_lens(sae, model, cfg.logit_k)
    nearest = an.nearest_features(sae, cfg.nearest)
    meta = meta | {"arch": sae.arch, "d_sae": sae.d_sae, "k": sae.k}
    an.save_analysis(stats, run_dir, tokenizer, meta, lens, nearest)
    return site.build_site(run_dir)
