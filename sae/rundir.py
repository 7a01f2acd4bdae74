"""A run directory's life cycle, and opening a finished one.

A training job assembles its run directory in `<run_dir>.tmp` and renames it into place when every SAE is
trained, evaluated and analysed, so a failed or interrupted job never leaves a half-written run directory:

    <run_dir>.tmp/                      while the job runs (one subdirectory per SAE of a `saes` list)
        checkpoint/                     the latest training checkpoint (sae.checkpoint), for resume=true
    <run_dir>/                          the finished run: sae.safetensors, cfg.json, run.json, metrics.json,
                                        analysis/, dashboard/
    <run_dir>.last-good-checkpoint/     where a diverged run's last finite checkpoint is kept

`open_run` reads a finished run back (its job, SAE and, optionally, the model and module it reads) for
analysis, the notebook explorer and the format exporters.
"""

import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae import harvest
from sae.checkpoint import find_checkpoint
from sae.config import SAEConfig, TrainJob, from_dict
from sae.devices import resolve_device
from sae.files import read_json
from sae.model import CONFIG, SAE, WEIGHTS, read_config
from sae.train import Interrupted, TrainingDiverged

RUN_JSON = "run.json"
"""The training job's settings, as `dataclasses.asdict(TrainJob)`: what reopening a run needs."""


def tmp_dir(final: Path) -> Path:
    """Where the job writing run directory `final` assembles it."""
    return final.with_name(final.name + ".tmp")


def sae_dirs(tmp: Path, final: Path, variants: list[SAEConfig]) -> list[tuple[Path, Path]]:
    """(temporary, final) directory of each SAE of a job: the run directory itself for one SAE, a
    subdirectory named after each for several."""
    if len(variants) == 1:
        return [(tmp, final)]
    return [(tmp / v.name, final / v.name) for v in variants]


# --- settings of a run ----------------------------------------------------------------------------------


def training_settings(job: TrainJob) -> dict:
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


def settings_diff(before: dict, now: dict) -> str:
    """The `training_settings` that differ, as "key: before -> now, ..." ("" when none)."""
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)


def resumed_state(checkpoint: Path, settings: dict) -> dict:
    """The state.json of the checkpoint a resumed SAE continues from ({} when there is none), checked to have
    been written with the training `settings` of this job."""
    found = find_checkpoint(checkpoint)
    if found is None:
        return {}
    saved = read_json(found / "state.json", "checkpoint state")
    diff = settings_diff(saved["settings"], settings) if "settings" in saved else ""
    if diff:
        raise ValueError(
            f"resume=true continues the run in {found} with the settings it started with, but {diff}; "
            "restore them, or delete the unfinished run to start over with the new ones"
        )
    return saved


def read_job(run_dir: Path) -> TrainJob | None:
    """The training job recorded in `run_dir/run.json`, or None where there is none."""
    path = Path(run_dir) / RUN_JSON
    return from_dict(TrainJob, read_json(path, "run settings")) if path.is_file() else None


def same_finished_run(cfg: TrainJob, variants: list[SAEConfig], final: Path) -> bool:
    """Whether `final` holds a finished run of every SAE of `cfg`, with the same training settings."""
    if not (final / "metrics.json").exists():
        return False
    for v, (_, out) in zip(variants, sae_dirs(final, final, variants)):
        try:
            done = read_job(out)
        except (ValueError, TypeError):
            return False
        if done is None or settings_diff(
            training_settings(done), training_settings(dataclasses.replace(cfg, sae=v, saes=[]))
        ):
            return False
    return True


def finished(out_dir: Path, analyzed: bool) -> bool:
    """Whether the SAE in `out_dir` was evaluated (and analysed, with `analyzed`) to the end."""
    return (out_dir / "metrics.json").exists() and (
        not analyzed or (out_dir / "dashboard" / "index.html").exists()
    )


# --- the temporary directory ----------------------------------------------------------------------------


def interrupted_checkpoint(tmp: Path) -> Path | None:
    """The checkpoint an interrupted run left in its temporary directory `tmp`, if any: that of an SAE not
    finished, else any."""
    found = [c for c in map(find_checkpoint, [tmp / "checkpoint", *sorted(tmp.glob("*/checkpoint"))]) if c]
    unfinished = [c for c in found if not (c.parent / "metrics.json").exists()]
    return (unfinished or found)[0] if found else None


def prepare_tmp(cfg: TrainJob, tmp: Path) -> None:
    """Clears `tmp` for a fresh run, or keeps it for `cfg.resume`; refuses to discard a resumable run."""
    waiting = interrupted_checkpoint(tmp) if tmp.exists() else None
    if waiting is not None and not cfg.resume:
        step = read_json(waiting / "state.json", "checkpoint state").get("step", "?")
        raise ValueError(
            f"{tmp} holds an unfinished run of run_dir={cfg.run_dir!r}, checkpointed at step {step}: pass "
            f"resume=true to continue it, or delete {tmp} to start over"
        )
    if waiting is None:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)


def finish(tmp: Path, final: Path) -> None:
    """Renames the assembled run directory `tmp` into place as `final`, replacing an earlier run there."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@contextlib.contextmanager
def cleaned_up_on_failure(tmp: Path, final: Path, rank: int = 0) -> Iterator[None]:
    """Whatever stops the job inside (a signal, a crash, a second Ctrl-C), a checkpoint it reached stays in
    `tmp` for resume=true, and a job that reached none leaves nothing behind. A diverged run is lost, but its
    last good checkpoint moves to `<run_dir>.last-good-checkpoint` before the rest is removed. Ranks other
    than 0 write nothing and clean nothing."""
    try:
        yield
    except TrainingDiverged as e:
        if rank != 0:
            raise
        if e.checkpoint is None or not e.checkpoint.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = final.with_name(final.name + ".last-good-checkpoint") / e.checkpoint.parent.relative_to(tmp)
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(e.checkpoint, kept)
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingDiverged(str(e).replace(str(e.checkpoint), str(kept)), kept) from None
    except BaseException as e:
        waiting = interrupted_checkpoint(tmp) if rank == 0 else None
        if rank == 0 and waiting is None:
            shutil.rmtree(tmp, ignore_errors=True)
        elif waiting is not None and not isinstance(e, Interrupted):
            print(
                f"{tmp} keeps its checkpoint {waiting}: run again with resume=true to continue from it",
                file=sys.stderr,
            )
        raise


# --- opening a finished run -----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A finished run directory, opened: its job, its SAE and, where asked for, the model and module the SAE
    reads."""

    dir: Path
    """The directory holding sae.safetensors and cfg.json."""
    job: TrainJob | None
    """The training job (`run.json`); None for an SAE saved outside train.py."""
    sae: SAE
    """The SAE, in eval mode, taking raw activations."""
    model: Any = None
    """The language model (with `open_run(model=True)`)."""
    tokenizer: Any = None
    module: str | None = None
    """The full path of the module the SAE reads."""


def sae_dir(run_dir: str | Path) -> Path:
    """`run_dir` checked to hold an SAE (sae.safetensors + cfg.json), with an error saying what is expected."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"run directory {str(path)!r} does not exist: expected a directory holding {WEIGHTS} and {CONFIG} "
            "(what train.py writes)"
        )
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        inner = sorted(p.name for p in path.iterdir() if (p / WEIGHTS).is_file())
        hint = f"; it holds several SAEs, pass one of its subdirectories: {inner}" if inner else ""
        raise FileNotFoundError(
            f"{str(path)!r} holds no {WEIGHTS} and {CONFIG}: is it a run directory?{hint}"
        )
    return path


def _no_run_json(path: Path) -> FileNotFoundError:
    subruns = sorted(p.parent.name for p in path.glob(f"*/{RUN_JSON}"))
    hint = "is it a finished training run?"
    if subruns:
        hint = f"it holds several SAEs, open one of {[str(path / p) for p in subruns]}"
    return FileNotFoundError(f"run_dir={str(path)!r} holds no {RUN_JSON}: {hint}")


def check_width(sae: SAE, model, module: str, model_name: str, source: Path | str, hint: str) -> None:
    """Raises unless `module` of `model` is as wide as the SAE's input; `hint` says what to do instead."""
    width = harvest.module_widths(model, [module])[module]
    if width != sae.d_in:
        raise ValueError(
            f"the SAE in {source} reads d_in={sae.d_in}, but {module} of model.name={model_name!r} has width "
            f"{width}; {hint}"
        )


def open_run(run_dir: str | Path, device: str | None = None, model: bool = True) -> Run:
    """Opens a finished run directory. With `model`, it needs `run.json` and loads the model and the module
    the SAE was trained on (checked to be as wide as the SAE); without, only the SAE (and `run.json` where
    present), on the CPU. `device` overrides the run's `model.device` (with `model`) or the CPU for the SAE."""
    path = Path(run_dir)
    if not model:
        path = sae_dir(path)
        return Run(path, read_job(path), SAE.load(path, device=resolve_device(device or "cpu")).eval())
    job = read_job(path)
    if job is None:
        raise _no_run_json(path)
    if device is not None:
        job.model = dataclasses.replace(job.model, device=device)
    lm, tokenizer = harvest.load_model(job.model)
    # cfg.json records the module the SAE was trained on (the full path, whatever alias named it).
    hook = read_config(path).get("hook") if (path / CONFIG).is_file() else None
    spec = hook or job.sae.hook or job.model.module
    module = harvest.resolve_module(lm, dataclasses.replace(job.model, module=spec))
    sae = SAE.load(path, device=resolve_device(job.model.device)).eval()
    hint = "open it with the model and module it was trained on"
    check_width(sae, lm, module, job.model.name, path, hint)
    return Run(path, job, sae, lm, tokenizer, module)
