"""Weights & Biases: the run of one SAE, the training logger, and the run directory as artifacts.

`wandb.mode` (online, offline, disabled) decides where it goes; ranks other than 0 of a data-parallel job log
nothing (`NoRun`, the same methods doing nothing, so callers need no branches).
"""

import dataclasses
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae.config import TrainJob
from sae.model import read_config


def wandb_run(cfg: TrainJob, run_dir: Path, run_id: str | None = None):
    """The W&B run of one SAE, its files in `run_dir`; `run_id` continues the run a resumed checkpoint was
    logged to."""
    import wandb

    return wandb.init(
        mode=cfg.wandb.mode,  # type: ignore[arg-type]  # checked against WANDB_MODES in config.py
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=cfg.wandb.name or Path(cfg.run_dir).name,
        dir=str(run_dir),
        config=dataclasses.asdict(cfg),
        id=run_id,
        resume="allow" if run_id else None,
        settings=wandb.Settings(quiet=True),  # its closing hints name the temporary directory; ours follow
    )


class NoRun:
    """Stands in for the W&B run on ranks other than 0, which log nothing."""

    id = None
    summary: dict = {}

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self, *args, **kwargs) -> None:
        pass


def logger(run):
    """Logs to W&B `run` (1-D tensors as histograms) and prints the scalars to the console."""
    import wandb

    def log(metrics: dict, step: int) -> None:
        logged = {k: wandb.Histogram(v.tolist()) if torch.is_tensor(v) else v for k, v in metrics.items()}
        run.log(logged, step=step)
        shown = {k.split("/")[-1]: v for k, v in metrics.items() if not torch.is_tensor(v)}
        tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    return log


def log_artifacts(run, run_dir: str | Path) -> list:
    """Logs the run directory to W&B `run` as two artifacts: the SAE (`sae.safetensors`, `cfg.json`,
    `metrics.json`; type `model`) and its dashboard (`dashboard/` and `analysis/`; type
    `dashboard`), each only with the files that exist. Files are copied when added, so `run_dir` may move after.
    Offline runs keep them (in W&B's staging directory) for `wandb sync`. Returns the artifacts logged."""
    import wandb

    if getattr(run, "disabled", False):  # wandb.mode=disabled: do not copy the files into W&B's staging area
        return []
    run_dir = Path(run_dir)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.name or run_dir.name) or "run"
    model = wandb.Artifact(f"{name}-sae", type="model", metadata=read_config(run_dir))
    dash = wandb.Artifact(f"{name}-dashboard", type="dashboard")
    for file in ("sae.safetensors", "cfg.json", "metrics.json"):
        if (run_dir / file).is_file():
            model.add_file(str(run_dir / file), name=file)
    if (run_dir / "dashboard").is_dir():
        dash.add_dir(str(run_dir / "dashboard"), name="dashboard")
    if (run_dir / "analysis").is_dir():
        dash.add_dir(str(run_dir / "analysis"), name="analysis")
    logged = [a for a in (model, dash) if a.manifest.entries]
    for artifact in logged:
        run.log_artifact(artifact)
    return logged
