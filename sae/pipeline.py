"""The jobs behind the entry scripts: harvest -> train -> evaluate -> analyze -> dashboard.

`run_training` checks everything that can be wrong with the input (model, module, data, sizes) before the
long work starts, then trains each SAE of the job in its run directory (`sae.rundir`); `run_analysis`
re-analyses a finished run or a SAELens SAE into a dashboard.
"""

import contextlib
import dataclasses
import functools
import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sae import analyze as an
from sae import devices, formats, harvest, rundir, scan, site, stream, synthetic, tracking
from sae.cache import ActivationCache, write_cache
from sae.config import SYNTHETIC, AnalyzeConfig, AnalyzeJob, DataConfig, SAEConfig, TrainJob, sae_variants
from sae.data import Contexts, check_held_out, packed_contexts
from sae.evaluate import evaluate_sae, loss_recovered
from sae.files import write_json
from sae.model import SAE
from sae.train import DIVERGED_FVU, Interrupted, TrainingDiverged, diverged_message, train


@dataclasses.dataclass
class _Session:
    """What every SAE of one training job shares: the job, the model and the lock its forwards hold, when
    the job started, and this process's place among the data-parallel ones."""

    cfg: TrainJob
    model: Any
    tokenizer: Any
    lock: threading.Lock
    start: float
    rank: int = 0
    world: int = 1


ANALYSIS_STATE = "analysis-state"
"""Where an analysis pass keeps its resumable state (`scan.analysis_pass`) until the analysis is written."""


def _check_k(sae: SAEConfig, d_in: int) -> None:
    d_sae = sae.width(d_in)
    if sae.k >= d_sae:
        how = (
            f"sae.d_sae={d_sae}"
            if sae.d_sae
            else f"sae.expansion_factor={sae.expansion_factor} x d_in={d_in}"
        )
        raise ValueError(f"sae.k={sae.k} must be smaller than the number of latents d_sae={d_sae} ({how})")


def _locked(fn: Callable, lock: threading.Lock) -> Callable:
    """`fn` called holding `lock`."""

    def call(*args, **kwargs):
        with lock:
            return fn(*args, **kwargs)

    return call


def _share(tokens: int, world: int) -> int:
    """One data-parallel rank's share of `tokens` (rounded up)."""
    return -(-tokens // world)


def _train_contexts(cfg: TrainJob, tokenizer, rank: int = 0, world: int = 1) -> Iterator[Contexts]:
    """The training context batches of this rank: every world-th batch from the rank-th on."""
    contexts = packed_contexts(cfg.data, tokenizer, "train", cfg.model.batch_size)
    return itertools.islice(contexts, rank, None, world) if world > 1 else contexts


def _streamed(
    cfg: TrainJob, model, tokenizer, module: str, lock: threading.Lock, rank: int = 0, world: int = 1
) -> stream.Shuffled:
    """This rank's activations harvested on the fly, pass after pass over its share of the corpus."""
    return harvest.streamed(
        model,
        module,
        lambda: _train_contexts(cfg, tokenizer, rank, world),
        cfg.train.buffer_tokens,
        cfg.train.batch_size // world,
        torch.Generator().manual_seed(cfg.train.seed + rank),
        cfg.model.max_norm_ratio,
        lock,
    )


def _cache_provenance(cfg: TrainJob) -> dict:
    """What changes the cached activations besides the modules, the model's dtype and the harvest settings
    `write_cache` adds itself. `model.batch_size` counts: `keep_rows` compares norms within a batch."""
    data = ("path", "name", "split", "text_column", "context_size", "holdout_every")
    return {
        "model": cfg.model.name,
        "gguf_file": cfg.model.gguf_file,
        "batch_size": cfg.model.batch_size,
        "data": {key: getattr(cfg.data, key) for key in data},
    }


def _train_one(
    s: _Session,
    sae_cfg: SAEConfig,
    module: str,
    d_in: int,
    batches: Iterator[torch.Tensor],
    replay: scan.Replay,
    out_dir: Path,
    final_dir: Path,
) -> dict:
    """Trains one SAE on `batches`, evaluates and analyses it, and writes its run directory `out_dir`
    (continuing from the checkpoint in it with `cfg.resume`).

    `batches` are made in a background thread while the SAE trains; when streamed, up to half a shuffle
    buffer ahead, so the forwards that refill the buffer overlap training. Model forwards hold the session's
    lock. `replay`: the harvested training batches the analysis encodes without a forward. Data-parallel ranks
    other than 0 train and take their share of the analysis, and return {}."""
    cfg, rank, world = s.cfg, s.rank, s.world
    device = devices.resolve_device(cfg.model.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    job = dataclasses.replace(cfg, sae=sae_cfg, saes=[], run_dir=str(final_dir), resume=False)
    checkpoint = out_dir / "checkpoint"
    evaluate = None
    if cfg.eval.train_loss_contexts and rank == 0:
        loss = functools.partial(
            loss_recovered,
            model=s.model,
            tokenizer=s.tokenizer,
            module=module,
            model_cfg=cfg.model,
            data=cfg.data,
            n_contexts=cfg.eval.train_loss_contexts,
            progress=False,
        )
        evaluate = _locked(loss, s.lock)
    local_batch = cfg.train.batch_size // world
    depth = 2 if cfg.train.in_memory else max(2, cfg.train.buffer_tokens // 2 // local_batch)
    with _tracked(job, out_dir, cfg.resume, rank) as (run, extra_state):
        sae = _fit(s, sae_cfg, batches, depth, run, checkpoint, device, evaluate, extra_state)
        held_out: list = []  # the held-out batches the evaluation harvests, analysed without a second forward
        if rank == 0:
            trained = {f"{k}_harvest_train": v for k, v in devices.peak_memory().items()}  # before evaluation
            metrics = evaluate_sae(
                sae, s.model, s.tokenizer, module, cfg, held_out if cfg.do_analyze else None
            )
            if metrics["fvu"] > DIVERGED_FVU:
                what = f"the held-out FVU is {metrics['fvu']:.3g} with {metrics['dead_fraction']:.0%} dead latents"
                raise TrainingDiverged(diverged_message(what, cfg.train, sae.d_sae), None)
        state_dir = out_dir / ANALYSIS_STATE
        stats = _analysis(s, sae, module, state_dir, replay, held_out) if cfg.do_analyze else None
        held_out.clear()
        if rank != 0:
            return {}
        metrics |= trained | devices.peak_memory()
        meta = {"model": cfg.model.name, "hook": module, "d_in": d_in}
        _write_run(
            s,
            job,
            sae,
            run,
            metrics,
            out_dir,
            meta | {"data": cfg.data.path, "context_size": cfg.data.context_size},
        )
        if stats is not None:
            write_analysis(stats, sae, s.model, s.tokenizer, cfg.analyze, out_dir, meta)
            shutil.rmtree(state_dir)
        tracking.log_artifacts(run, out_dir)  # W&B copies the files now, before out_dir is renamed
    return metrics


@contextlib.contextmanager
def _tracked(job: TrainJob, out_dir: Path, resume: bool, rank: int) -> Iterator[tuple[Any, dict]]:
    """The W&B run of one SAE (continued where a resumed checkpoint logged to one; `NoRun` off rank 0) and
    the extra state its checkpoints keep (the training settings a resume must match); the run is finished
    on the way out, marked stopped when training was interrupted."""
    settings = rundir.training_settings(job)
    saved = rundir.resumed_state(out_dir / "checkpoint", settings) if resume else {}
    run = tracking.wandb_run(job, out_dir, saved.get("wandb_id")) if rank == 0 else tracking.NoRun()
    exit_code = 0
    try:
        yield run, {"settings": settings} | ({"wandb_id": run.id} if run.id else {})
    except Interrupted:
        exit_code = 1  # W&B marks the run as stopped, and continues it on resume
        raise
    finally:
        run.finish(exit_code=exit_code)


def _fit(
    s: _Session,
    sae_cfg: SAEConfig,
    batches: Iterator[torch.Tensor],
    depth: int,
    run,
    checkpoint: Path,
    device: torch.device,
    evaluate: Callable | None,
    extra_state: dict,
) -> SAE:
    """`train` on `batches`, made in a background thread up to `depth` batches ahead."""
    ahead = stream.prefetch(batches, depth)
    try:
        return train(
            sae_cfg,
            s.cfg.train,
            ahead,
            log=tracking.logger(run) if s.rank == 0 else lambda m, step: None,
            checkpoint_dir=checkpoint,
            device=device,
            evaluate=evaluate,
            resume=s.cfg.resume,
            extra_state=extra_state,
        )
    finally:
        ahead.close()  # stops the producer before this thread runs the model


def _write_run(s: _Session, job: TrainJob, sae: SAE, run, metrics: dict, out_dir: Path, meta: dict) -> None:
    """Writes the SAE, its job and its metrics (with the wall time so far) into `out_dir`; the metrics also
    go to the W&B run's summary."""
    metrics["wall_seconds"] = round(time.time() - s.start, 1)
    run.summary.update({f"eval/{k}": v for k, v in metrics.items()})
    sae.save(out_dir, extra=meta)
    write_json(out_dir / rundir.RUN_JSON, dataclasses.asdict(job))
    write_json(out_dir / "metrics.json", metrics)


def _analysis(
    s: _Session, sae: SAE, module: str, state_dir: Path, replay: scan.Replay, held_out: scan.Replay
) -> an.FeatureStats | None:
    """This rank's share of the analysis pass over the job's corpus; the merged statistics on rank 0."""
    cfg = s.cfg
    return scan.analysis_pass(
        sae,
        s.model,
        s.tokenizer,
        module,
        cfg.model,
        cfg.data,
        cfg.analyze,
        state_dir,
        replay,
        s.rank,
        s.world,
        cfg.resume,
        held_out,
    )


def _first_batch(cfg: TrainJob, tokenizer, rank: int, world: int) -> Iterator[Contexts]:
    """This rank's training context batches, the first one read now, so a bad corpus fails before any long
    work."""
    contexts = _train_contexts(cfg, tokenizer, rank, world)
    first = next(contexts, None)
    if first is None:
        raise ValueError(
            f"data.path={cfg.data.path!r} gives rank {rank} of {world} data-parallel processes no context "
            "batch: use fewer processes or more data"
        )
    return itertools.chain([first], contexts)


def _checked(cfg: TrainJob, variants: list[SAEConfig], modules: list[str], widths: dict, world: int) -> None:
    """Raises on settings that cannot work together, before any harvest."""
    for v, m in zip(variants, modules):
        _check_k(v, widths[m])
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


def _cache(s: _Session, directory: str, modules: list[str], contexts: Iterator[Contexts]) -> ActivationCache:
    """The activation cache of the job in `directory`, harvested now unless a complete one of the same settings exists.

    Data-parallel ranks harvest it together: each reads the whole train stream and harvests its own context
    batches (batch i on rank i % world) into the one cache, which holds what a single process would write;
    `write_cache` returns on every rank once the cache is complete, so each then reads the whole of it."""
    cfg = s.cfg
    if s.world > 1:  # `contexts` holds this rank's batches only; the cache numbers them in the whole stream
        contexts = packed_contexts(cfg.data, s.tokenizer, "train", cfg.model.batch_size)
    return write_cache(
        directory,
        s.model,
        modules,
        contexts,
        cfg.train.harvest_tokens,
        cfg.model.max_norm_ratio,
        _cache_provenance(cfg),
        rank=s.rank,
        world=s.world,
    )


def _batches(
    s: _Session, module: str, xs: dict[str, torch.Tensor], cache: ActivationCache | None
) -> Iterator[torch.Tensor]:
    """This rank's training batches of `module`: from the in-memory harvest `xs`, the cache, or streamed."""
    cfg, rank, world = s.cfg, s.rank, s.world
    g = torch.Generator().manual_seed(cfg.train.seed + rank)
    local_batch, tokens = cfg.train.batch_size // world, _share(cfg.train.tokens, world)
    if cfg.train.in_memory:
        return stream.epochs(xs[module], local_batch, tokens, g)
    if cache is not None:
        return cache.batches(module, local_batch, tokens, g, cfg.train.buffer_tokens, shard=(rank, world))
    return _streamed(cfg, s.model, s.tokenizer, module, s.lock, rank, world)


def _in_memory(
    s: _Session,
    modules: list[str],
    pending: list[str],
    contexts: Iterator[Contexts],
    cache: ActivationCache | None,
    kept: list[tuple[Contexts, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The in-memory training tokens [B, D] of the modules still to train (`pending`); {} when streaming.
    A harvest made here appends the (contexts, used) of the batches it harvested whole to `kept`."""
    cfg, rank, world = s.cfg, s.rank, s.world
    if not cfg.train.in_memory or not pending:
        return {}
    if cache is not None:
        # Each rank keeps every W-th token (a copy, so the whole cache is freed).
        return {m: cache.load(m)[rank::world].clone() if world > 1 else cache.load(m) for m in pending}
    # All modules, as the first attempt harvested them: the same tokens whichever SAEs are left.
    tokens = _share(cfg.train.harvest_tokens, world)
    return harvest.harvest_tensors(s.model, modules, contexts, tokens, cfg.model.max_norm_ratio, kept=kept)


def _replay(
    s: _Session,
    module: str,
    xs: dict[str, torch.Tensor],
    kept: list[tuple[Contexts, torch.Tensor]],
    cache: ActivationCache | None,
) -> scan.Replay:
    """This rank's harvested training batches of `module` for the analysis: from the cache, or the in-memory
    harvest; none when streamed."""
    if cache is not None:
        return cache.replay(module, s.rank, s.world)
    if module in xs and kept:
        return scan.replay_in_memory(xs[module], kept, s.rank, s.world)
    return ()


def run_training(cfg: TrainJob) -> dict:
    """Harvest once, then train, evaluate on held-out rows and (if `do_analyze`) analyze each SAE of the job;
    returns the metrics (for several SAEs, keyed by each one's directory name).

    With `cfg.resume`, SAEs finished before the interruption are kept, the interrupted one continues from
    its checkpoint, and the rest train as usual. Under torchrun each rank harvests its own share of the
    context batches and trains with cfg.train.batch_size / world tokens a step; rank 0 writes the run."""
    start = time.time()
    rank, world = devices.distributed(cfg.train.batch_size, cfg.model.device)
    final = rundir.run_path(cfg.run_dir)
    with rundir.locked(final) if rank == 0 else contextlib.nullcontext():
        return _run_training(cfg, final, start, rank, world)


def _run_training(cfg: TrainJob, final: Path, start: float, rank: int, world: int) -> dict:
    """`run_training` of this process, holding the run directory's lock on rank 0."""
    variants = sae_variants(cfg)
    tmp = rundir.tmp_dir(final)
    if cfg.resume and not tmp.exists() and rundir.same_finished_run(cfg, variants, final):
        print(f"run_dir={cfg.run_dir!r} is finished with these settings: nothing to resume")
        return json.loads((final / "metrics.json").read_text())
    if rank == 0:
        rundir.check_run_dir(cfg, final)
    if cfg.data.path == SYNTHETIC:
        return _run_synthetic(cfg, variants, final, start, rank, world)
    model, tokenizer = harvest.load_model(cfg.model)
    s = _Session(cfg, model, tokenizer, threading.Lock(), start, rank, world)
    default = harvest.resolve_module(model, cfg.model)
    modules = [
        harvest.resolve_module(model, dataclasses.replace(cfg.model, module=v.hook)) if v.hook else default
        for v in variants
    ]
    harvested = sorted(set(modules))
    widths = harvest.module_widths(model, harvested)
    _checked(cfg, variants, modules, widths, world)
    contexts = _first_batch(cfg, tokenizer, rank, world)
    check_held_out(cfg.data, tokenizer, cfg.model.batch_size)
    # Before the run directory: a cache of other settings fails here.
    cache = _cache(s, cfg.train.cache_dir, harvested, contexts) if cfg.train.cache_dir else None

    if rank == 0:
        rundir.prepare_tmp(cfg, tmp)
    if world > 1:
        dist.barrier()
    with rundir.cleaned_up_on_failure(tmp, final, rank):
        out_dirs = rundir.sae_dirs(tmp, final, variants)
        results = {}
        for v, (out_dir, _) in zip(variants, out_dirs):
            if cfg.resume and rundir.finished(out_dir, cfg.do_analyze):  # before the interruption
                results[v.name] = json.loads((out_dir / "metrics.json").read_text())
        pending = sorted({m for v, m in zip(variants, modules) if v.name not in results})
        kept: list[tuple[Contexts, torch.Tensor]] = []
        xs = _in_memory(s, harvested, pending, contexts, cache, kept)
        for v, m, (out_dir, final_dir) in zip(variants, modules, out_dirs):
            if v.name not in results:
                batches, replay = _batches(s, m, xs, cache), _replay(s, m, xs, kept, cache)
                results[v.name] = _train_one(s, v, m, widths[m], batches, replay, out_dir, final_dir)
        if rank != 0:
            return {}
        if len(variants) > 1:
            write_json(tmp / "metrics.json", results)
        rundir.finish(tmp, final)
    for offline in sorted(final.glob("**/wandb/offline-run-*")):
        print(f"W&B offline run: upload it with `wandb sync {offline}`")
    peak = results[variants[0].name]
    cuda = peak.get("peak_cuda_gb_harvest_train")
    print(
        f"peak memory of harvest + training: host {peak['peak_rss_gb_harvest_train']:.2f} GiB RSS"
        + (f", cuda {cuda:.2f} GiB" if cuda is not None else "")
        + f"; of the whole run: host {devices.peak_memory()['peak_rss_gb']:.2f} GiB"
    )
    return results[variants[0].name] if len(variants) == 1 else results


def _run_synthetic(
    cfg: TrainJob, variants: list[SAEConfig], final: Path, start: float, rank: int, world: int
) -> dict:
    """`run_training` on activations drawn from the known dictionary `cfg.synthetic` (no model, no text):
    each SAE trains on the same samples (`train.seed`) and is measured against the truth on fresh ones; the
    dictionary is saved beside them (`synthetic.FILE`)."""
    tmp = rundir.tmp_dir(final)
    device = devices.resolve_device(cfg.model.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    for v in variants:
        _check_k(v, cfg.synthetic.d_in)
    features = synthetic.Features.make(cfg.synthetic).to(device)
    s = _Session(cfg, None, None, threading.Lock(), start, rank, world)
    if rank == 0:
        rundir.prepare_tmp(cfg, tmp)
    if world > 1:
        dist.barrier()
    with rundir.cleaned_up_on_failure(tmp, final, rank):
        results = {}
        for v, (out_dir, final_dir) in zip(variants, rundir.sae_dirs(tmp, final, variants)):
            if cfg.resume and rundir.finished(out_dir, analyzed=False):  # before the interruption
                results[v.name] = json.loads((out_dir / "metrics.json").read_text())
            else:
                results[v.name] = _train_synthetic(s, v, features, out_dir, final_dir, device)
        if rank != 0:
            return {}
        if len(variants) > 1:
            write_json(tmp / "metrics.json", results)
        features.save(tmp / synthetic.FILE)
        rundir.finish(tmp, final)
    print(ground_truth_table(results if len(variants) > 1 else {variants[0].name: results[variants[0].name]}))
    return results[variants[0].name] if len(variants) == 1 else results


def _train_synthetic(
    s: _Session, sae_cfg: SAEConfig, features: synthetic.Features, out_dir: Path, final_dir: Path, device
) -> dict:
    """Trains one SAE on samples of `features`, measures it against them, and writes its run directory."""
    cfg, rank, world = s.cfg, s.rank, s.world
    job = dataclasses.replace(cfg, sae=sae_cfg, saes=[], run_dir=str(final_dir), resume=False)
    local_batch, tokens = cfg.train.batch_size // world, _share(cfg.train.tokens, world)
    samples = synthetic.Samples(features, local_batch, tokens, cfg.train.seed, rank, world)
    with _tracked(job, out_dir, cfg.resume, rank) as (run, extra_state):
        sae = _fit(s, sae_cfg, samples, 2, run, out_dir / "checkpoint", device, None, extra_state)
        if rank != 0:
            return {}
        truth = synthetic.ground_truth(
            sae, features, cfg.synthetic.eval_samples, cfg.train.batch_size, cfg.train.seed
        )
        metrics = truth | devices.peak_memory()
        meta = {"model": SYNTHETIC, "hook": None, "d_in": sae.d_in, "data": SYNTHETIC}
        _write_run(s, job, sae, run, metrics, out_dir, meta)
        tracking.log_artifacts(run, out_dir)
    return metrics


GROUND_TRUTH = (
    ("MCC", "gt_mcc"),
    ("F1", "gt_f1"),
    ("precision", "gt_precision"),
    ("recall", "gt_recall"),
    ("uniqueness", "gt_uniqueness"),
    ("splitting", "gt_splitting"),
    ("absorption", "gt_absorption"),
    ("EV", "explained_variance"),
    ("FVU", "fvu"),
    ("L0", "l0"),
    ("dead", "dead_fraction"),
)
"""The columns of `ground_truth_table`: a heading and its key in metrics.json."""


def ground_truth_table(results: dict[str, dict]) -> str:
    """A markdown table of the ground-truth metrics of each named SAE."""
    head = "| SAE | " + " | ".join(h for h, _ in GROUND_TRUTH) + " |"
    rule = "|---" * (len(GROUND_TRUTH) + 1) + "|"
    rows = [
        f"| {name} | "
        + " | ".join(f"{m[key]:.3f}" if key != "l0" else f"{m[key]:.1f}" for _, key in GROUND_TRUTH)
        + " |"
        for name, m in results.items()
    ]
    return "\n".join([head, rule, *rows])


def _saelens_job(job: AnalyzeJob) -> tuple[SAE, TrainJob, str | None]:
    """The SAELens SAE `job.sae_dir`, the training job it stands for (model, module, corpus), and the model
    its cfg.json names."""
    imported, meta = formats.from_saelens(job.sae_dir)  # type: ignore[arg-type]
    hook = job.model.module or formats.module_for_hook(meta["hook_name"], meta["hf_hook_name"])
    context = meta["context_size"] or DataConfig.context_size
    data = DataConfig(path=job.data_path or DataConfig.path, context_size=context)
    cfg = TrainJob(model=dataclasses.replace(job.model, module=hook), data=data)
    return imported, cfg, meta["model_name"]


def _run_cache(cfg: TrainJob, module: str) -> ActivationCache | None:
    """The run's activation cache of `module`, where it is still there and complete; else None (a note says
    why, and the analysis runs the model for every batch)."""
    if not cfg.train.cache_dir:
        return None
    try:
        cache = ActivationCache(cfg.train.cache_dir)
    except (OSError, ValueError) as err:
        print(f"the run's activation cache is not used: {err}")
        return None
    return cache if module in cache.modules else None


def run_analysis(job: AnalyzeJob) -> Path | None:
    """Re-analyzes a finished run directory (with its recorded model, hook and corpus), or a SAELens SAE
    (`job.sae_dir`, on `job.model`) into `job.run_dir`, into a dashboard; returns the site's directory (None on
    data-parallel ranks other than 0, which only take their share of the pass).

    The run's activation cache (`train.cache_dir`), where it is complete, gives the activations of the
    batches it holds without a forward. With `job.resume`, an interrupted analysis continues from its state."""
    run_dir = Path(job.run_dir)
    cache = None
    if job.sae_dir:
        imported, cfg, model_name = _saelens_job(job)
        model, tokenizer = harvest.load_model(cfg.model)
        module = harvest.resolve_module(model, cfg.model)
        sae = imported.to(devices.resolve_device(cfg.model.device)).eval()
        hint = f"its cfg.json names model {model_name!r}"
        rundir.check_width(sae, model, module, cfg.model.name, job.sae_dir, hint)
    else:
        run = rundir.open_run(run_dir)
        assert run.job is not None and run.module is not None
        cfg, sae, model, tokenizer, module = run.job, run.sae, run.model, run.tokenizer, run.module
        cache = None if job.data_path else _run_cache(cfg, module)
    rank, world = devices.distributed(None, cfg.model.device)
    data = dataclasses.replace(cfg.data, path=job.data_path) if job.data_path else cfg.data
    replay = cache.replay(module, rank, world) if cache is not None else ()
    state_dir = run_dir / ANALYSIS_STATE
    stats = scan.analysis_pass(
        sae,
        model,
        tokenizer,
        module,
        cfg.model,
        data,
        job.analyze,
        state_dir,
        replay,
        rank,
        world,
        job.resume,
    )
    if stats is None:
        return None
    meta = {"model": cfg.model.name, "hook": module, "d_in": sae.d_in}
    path = write_analysis(stats, sae, model, tokenizer, job.analyze, run_dir, meta)
    shutil.rmtree(state_dir)
    peak = devices.peak_memory()
    cuda = f", cuda {peak['peak_cuda_gb']:.2f} GiB" if "peak_cuda_gb" in peak else ""
    print(
        f"peak memory of the analysis: host {peak['peak_rss_gb']:.2f} GiB RSS{cuda} ({stats.tokens:,} tokens)"
    )
    return path


def write_analysis(
    stats: an.FeatureStats, sae: SAE, model, tokenizer, cfg: AnalyzeConfig, run_dir: Path, meta: dict
) -> Path:
    """Adds the logit lens and nearest features to the statistics of a finished pass, writes `analysis/`
    and builds the dashboard site; returns the site's directory."""
    lens = an.logit_lens(sae, model, cfg.logit_k)
    nearest = an.nearest_features(sae, cfg.nearest)
    meta = meta | {"arch": sae.arch, "d_sae": sae.d_sae, "k": sae.k}
    an.save_analysis(stats, run_dir, tokenizer, meta, lens, nearest)
    return site.build_site(run_dir)
