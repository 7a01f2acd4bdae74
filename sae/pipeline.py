"""The jobs behind the entry scripts: harvest -> train -> evaluate -> analyze -> dashboard.

A run directory is assembled in `<run_dir>.tmp` and renamed into place at the end, so a failed or
interrupted job never leaves a half-written run directory behind. Everything that can be wrong with the
input (model, module, data, sizes) is checked before the long work starts.
"""

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae import analyze as an
from sae import dashboard, harvest
from sae.config import AnalyzeJob, DataConfig, ModelConfig, TrainJob, from_dict
from sae.data import Contexts, packed_contexts
from sae.files import write_json
from sae.metrics import dead_fraction, firing_counts, next_token_loss
from sae.model import SAE
from sae.train import train


def _check_width(cfg: TrainJob, d_in: int) -> None:
    d_sae = cfg.sae.expansion_factor * d_in
    if cfg.sae.k >= d_sae:
        raise ValueError(
            f"sae.k={cfg.sae.k} must be smaller than the number of latents d_sae={d_sae} "
            f"(sae.expansion_factor={cfg.sae.expansion_factor} x d_in={d_in})"
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


def _streamed(cfg: TrainJob, model, tokenizer, module: str) -> Iterator[torch.Tensor]:
    """Activations harvested on the fly through the shuffle buffer, passing over the corpus repeatedly."""
    g = torch.Generator().manual_seed(cfg.train.seed)

    def passes() -> Iterator[torch.Tensor]:
        for _ in itertools.count():
            contexts = packed_contexts(cfg.data, tokenizer, "train", cfg.model.batch_size)
            for x, _, _ in harvest.activations(
                model, module, contexts, max_norm_ratio=cfg.model.max_norm_ratio
            ):
                yield x

    return harvest.shuffled(passes(), cfg.train.buffer_tokens, cfg.train.batch_size, g)


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
                stats.update(an.place_latents(sae, code, used), batch)
            bar.update(len(x))
    total_var = sum_x2 - sum_x.pow(2).sum().item() / n  # sum ||x - mean||^2
    return {
        "fvu": sq_err / total_var,
        "l0": l0_sum / n,
        "dead_fraction": dead_fraction(counts),
        "held_out_tokens": n,
        "outlier_fraction": 1 - n / text_tokens,
    }


@torch.no_grad()
def loss_recovered(sae: SAE, model, tokenizer, module: str, model_cfg: ModelConfig, data: DataConfig,
                   n_contexts: int) -> dict:  # fmt: skip
    """Next-token CE on held-out contexts: clean, with the SAE spliced in, and with the activation zeroed.

    Tokens `keep_rows` skips (massive activations) keep their activation in both the spliced and the
    zero-ablated run, so both change exactly the tokens the SAE is evaluated on.
    """
    device = next(sae.parameters()).device
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0

    def only_kept(fn):
        def replace(x: torch.Tensor) -> torch.Tensor:
            keep = harvest.keep_rows(x, model_cfg.max_norm_ratio)[:, None]
            return torch.where(keep, fn(x.to(device)).to(x.device), x)

        return replace

    replace = {
        "clean": None,
        "spliced": only_kept(lambda x: sae(x).x_hat),
        "zero": only_kept(torch.zeros_like),
    }
    bs = min(model_cfg.batch_size, n_contexts)
    batches = itertools.islice(packed_contexts(data, tokenizer, "test", bs), -(-n_contexts // bs))
    for batch in tqdm(batches, desc="loss recovered", total=-(-n_contexts // bs)):
        for name, fn in replace.items():
            ce, m = next_token_loss(model, batch.ids, batch.mask, module if fn else None, fn)
            totals[name] += ce
        count += m
    out = {f"ce_{k}": v / count for k, v in totals.items()}
    out["loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / (out["ce_zero"] - out["ce_clean"])
    return out


def _wandb_run(cfg: TrainJob, run_dir: Path):
    import wandb

    return wandb.init(
        mode=cfg.wandb.mode,  # type: ignore[arg-type]  # checked against WANDB_MODES in config.py
        project=cfg.wandb.project, entity=cfg.wandb.entity,
        name=cfg.wandb.name or Path(cfg.run_dir).name, dir=str(run_dir), config=dataclasses.asdict(cfg),
        settings=wandb.Settings(quiet=True),  # its closing hints name the temporary directory; ours follow
    )  # fmt: skip


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def run_training(cfg: TrainJob) -> dict:
    """Harvest, train, evaluate on held-out rows and (if `do_analyze`) analyze; returns the metrics."""
    start = time.time()
    model, tokenizer = harvest.load_model(cfg.model)
    module = harvest.resolve_module(model, cfg.model)
    train_contexts = packed_contexts(cfg.data, tokenizer, "train", cfg.model.batch_size)
    first = next(train_contexts)  # fails now on a bad corpus, before any long work
    d_in = harvest.capture(model, [module], first.ids[:1])[module].shape[-1]
    _check_width(cfg, d_in)

    final = Path(cfg.run_dir)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        device = harvest.resolve_device(cfg.model.device)
        g = torch.Generator().manual_seed(cfg.train.seed)
        contexts = itertools.chain([first], train_contexts)
        if cfg.train.in_memory:
            x = harvest_in_memory(model, module, contexts, cfg.train.harvest_tokens, cfg.model.max_norm_ratio)
            batches = harvest.epochs(x, cfg.train.batch_size, cfg.train.tokens, g)
        else:
            batches = _streamed(cfg, model, tokenizer, module)
        run = _wandb_run(cfg, tmp)
        try:
            sae = train(cfg.sae, cfg.train, batches, log=lambda m, s: run.log(m, step=s),
                        checkpoint_dir=tmp / "checkpoint", device=device)  # fmt: skip
            sae.eval()
            stats = an.FeatureStats(sae.d_sae, cfg.analyze) if cfg.do_analyze else None
            tokens = max(cfg.eval.tokens, cfg.analyze.tokens if cfg.do_analyze else 0)
            metrics = held_out_pass(sae, model, tokenizer, module, cfg.model, cfg.data, tokens, stats)
            if cfg.eval.loss_contexts:
                metrics |= loss_recovered(
                    sae, model, tokenizer, module, cfg.model, cfg.data, cfg.eval.loss_contexts
                )
            metrics["wall_seconds"] = round(time.time() - start, 1)
            run.summary.update({f"eval/{k}": v for k, v in metrics.items()})
            meta = {"model": cfg.model.name, "hook": module, "d_in": d_in}
            sae.save(tmp, extra=meta | {"data": cfg.data.path, "context_size": cfg.data.context_size})
            write_json(tmp / "run.json", dataclasses.asdict(cfg))
            write_json(tmp / "metrics.json", metrics)
            if stats is not None:
                lens = an.logit_lens(sae, model, cfg.analyze.logit_k)
                an.save_analysis(stats, tmp, tokenizer, meta | {"d_sae": sae.d_sae, "k": sae.k}, lens)
                dashboard.render_dashboard(dashboard.load_analysis(tmp), tmp / "dashboard.html")
        finally:
            run.finish()
        _replace_dir(tmp, final)
        for offline in sorted((final / "wandb").glob("offline-run-*")):
            print(f"W&B offline run: upload it with `wandb sync {offline}`")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def run_analysis(job: AnalyzeJob) -> Path:
    """Re-analyzes a finished run directory (with its recorded model, hook and corpus) into a dashboard."""
    run_dir = Path(job.run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"run_dir={job.run_dir!r} holds no run.json: is it a finished training run?")
    cfg = from_dict(TrainJob, json.loads((run_dir / "run.json").read_text()))
    data = dataclasses.replace(cfg.data, path=job.data_path) if job.data_path else cfg.data
    model, tokenizer = harvest.load_model(cfg.model)
    module = harvest.resolve_module(model, cfg.model)
    sae = SAE.load(run_dir, device=harvest.resolve_device(cfg.model.device)).eval()
    stats = an.FeatureStats(sae.d_sae, job.analyze)
    held_out_pass(sae, model, tokenizer, module, cfg.model, data, job.analyze.tokens, stats)
    lens = an.logit_lens(sae, model, job.analyze.logit_k)
    meta = {"model": cfg.model.name, "hook": module, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k}
    an.save_analysis(stats, run_dir, tokenizer, meta, lens)
    return dashboard.render_dashboard(dashboard.load_analysis(run_dir), run_dir / "dashboard.html")
