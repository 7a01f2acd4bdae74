"""A run directory's life cycle, and opening a finished one.

A training job assembles its run directory in `<run_dir>.tmp` and renames it into place when every SAE is
trained, evaluated and analysed, so a failed or interrupted job never leaves a half-written run directory:

    <run_dir>.tmp/                      while the job runs (one subdirectory per SAE of a `saes` list)
        checkpoint/                     the latest training checkpoint (sae.checkpoint), for resume=true
    <run_dir>/                          the finished run: sae.safetensors, cfg.json, run.json, metrics.json,
                                        analysis/, dashboard/
    <run_dir>.last-good-checkpoint/     where a diverged run's last finite checkpoint is kept

A run directory is ours only if we made it: a directory is replaced only when it is empty or a finished run of
this tool (its `.sae-run` marker, or the files a run holds) with nothing else in it, and only with
`overwrite=true`; anything else is refused before any work. `<run_dir>.lock` makes one job at a time the
writer of a run directory.

`open_run` reads a finished run back (its job, SAE and, optionally, the model and module it reads) for
analysis, the notebook explorer and the format exporters.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae import harvest
from sae.checkpoint import find_checkpoint
from sae.config import SYNTHETIC, SAEConfig, TrainJob, from_dict
from sae.devices import resolve_device
from sae.files import read_json, write_json
from sae.model import CONFIG, SAE, WEIGHTS, read_config
from sae.train import Interrupted, TrainingDiverged

RUN_JSON = "run.json"
"""The training job's settings, as `dataclasses.asdict(TrainJob)`: what reopening a run needs."""
MARKER = ".sae-run"
"""Written into every directory this tool assembles (and so into every finished run): what makes a directory
ours to replace."""
FAILED = "failed.json"
"""Left in `<run_dir>.tmp` by an error after a checkpoint: the error, and whether resuming can get past it."""
OURS = {"sae.safetensors", "cfg.json", RUN_JSON, "metrics.json", "analysis", "dashboard", "wandb", MARKER}
"""What a run directory of this tool holds (besides checkpoints and the directories of a `saes` list)."""


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
    groups = ("model", "data", "sae", "train") + (("synthetic",) if job.data.path == SYNTHETIC else ())
    for group in groups:
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


class SettingsChanged(ValueError):
    """resume=true with other training settings than the checkpoint's: refused, the checkpoint kept as it is."""


def resumed_state(checkpoint: Path, settings: dict) -> dict:
    """The state.json of the checkpoint a resumed SAE continues from ({} when there is none), checked to have
    been written with the training `settings` of this job."""
    found = find_checkpoint(checkpoint)
    if found is None:
        return {}
    saved = read_json(found / "state.json", "checkpoint state")
    diff = settings_diff(saved["settings"], settings) if "settings" in saved else ""
    if diff:
        raise SettingsChanged(
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
    """Clears `tmp` for a fresh run, or keeps it for `cfg.resume`; refuses to discard a resumable run, and
    to resume past an error that resuming would meet again."""
    waiting = interrupted_checkpoint(tmp) if tmp.exists() else None
    failed = read_json(tmp / FAILED, "failure record") if (tmp / FAILED).is_file() else None
    if waiting is not None and failed is not None and not failed.get("resumable", True):
        if cfg.resume:
            raise ValueError(
                f"resume=true cannot help: the last attempt at run_dir={cfg.run_dir!r} failed after its "
                f"checkpoint with {failed.get('error')}, which resuming would meet again. Fix its cause and "
                f"run without resume=true to start over ({tmp} is then replaced)"
            )
        print(f"{tmp}: starting over (the last attempt failed with {failed.get('error')})", file=sys.stderr)
        waiting = None
    if waiting is not None and not cfg.resume:
        step = read_json(waiting / "state.json", "checkpoint state").get("step", "?")
        raise ValueError(
            f"{tmp} holds an unfinished run of run_dir={cfg.run_dir!r}, checkpointed at step {step}: pass "
            f"resume=true to continue it, or delete {tmp} to start over"
        )
    if waiting is None:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / FAILED).unlink(missing_ok=True)
    if not (tmp / MARKER).exists():
        write_json(tmp / MARKER, {"tool": "sae", "created": _now()})


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def finish(tmp: Path, final: Path) -> None:
    """Renames the assembled run directory `tmp` into place as `final`, replacing what `check_run_dir`
    allowed there: an empty directory, or a finished run of ours with nothing else in it."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    elif final.exists():
        foreign = _foreign(final)
        if foreign:  # added since the job started: still not ours to delete
            raise FileExistsError(
                f"run_dir={str(final)!r} now holds files this tool did not write ({', '.join(foreign[:5])}); "
                f"the new run stays in {tmp}: move those files out and rename it, or keep both"
            )
        old = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
        return
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
        elif waiting is not None and not isinstance(e, Interrupted | SettingsChanged):
            _record_failure(tmp, waiting, e)
        raise


def _record_failure(tmp: Path, waiting: Path, e: BaseException) -> None:
    """Says what a failure after checkpoint `waiting` leaves in `tmp`, and records it there (`FAILED`)."""
    # Bad input found late (data, settings) is met again by a resumed run; a crash, a full disk or a lost
    # node are not.
    resumable = not isinstance(e, ValueError | TypeError)
    error = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        write_json(tmp / FAILED, {"error": error, "resumable": resumable, "when": _now()})
    if resumable:
        advice = "run again with resume=true to continue from it"
    else:
        advice = (
            "resume=true would meet the same error. Fix its cause and run again without resume=true to start "
            f"over ({tmp} is then replaced), or delete {tmp}"
        )
    print(f"{tmp} keeps its checkpoint {waiting}: {advice}", file=sys.stderr)


# --- before any work: what run_dir names, and who writes it --------------------------------------------


def _is_run(path: Path) -> bool:
    """Whether directory `path` is a finished run of this tool (one SAE, or a `saes` list of them)."""
    if (path / MARKER).is_file():
        return True
    if (path / RUN_JSON).is_file() and (path / "sae.safetensors").is_file():
        return True  # written before the marker existed
    subruns = [p for p in path.iterdir() if p.is_dir() and (p / RUN_JSON).is_file()]
    return (path / "metrics.json").is_file() and bool(subruns)


def _foreign(path: Path) -> list[str]:
    """The entries of run directory `path` that this tool did not write, as paths relative to it."""
    out = []
    for entry in sorted(path.iterdir()):
        if entry.name in OURS or entry.name.startswith("checkpoint"):
            continue
        if entry.is_dir() and (entry / RUN_JSON).is_file():  # one SAE of a `saes` list
            out += [f"{entry.name}/{name}" for name in _foreign(entry)]
        else:
            out.append(entry.name)
    return out


def _ours_tmp(tmp: Path) -> bool:
    """Whether `tmp` is a temporary directory this tool made (or an empty one)."""
    return (tmp / MARKER).is_file() or interrupted_checkpoint(tmp) is not None or not any(tmp.iterdir())


def run_path(run_dir: str) -> Path:
    """`run_dir` as a path, checked to name a directory of its own (not `.`, `..` or `/`), under directories
    (not files), where we may write."""
    final = Path(run_dir).expanduser()
    if final.name in ("", ".", ".."):
        raise ValueError(
            f"run_dir={run_dir!r} names {str(final.resolve())!r}, not a directory of its own; give a new "
            "directory for the run, e.g. run_dir=runs/my-run"
        )
    for parent in final.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"run_dir={run_dir!r} cannot be created: {str(parent)!r} is a file")
    # `<run_dir>.tmp` and `<run_dir>.lock` are made beside it: its parent (or the nearest that exists) is written.
    existing = next(p for p in [final.parent, *final.parent.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"run_dir={run_dir!r} cannot be created: {str(existing)!r} is not writable (read-only file system "
            "or permissions); give a run_dir on a writable file system"
        )
    return final


def check_run_dir(cfg: TrainJob, final: Path) -> None:
    """Refuses, before any work, a run directory `final` (`run_path(cfg.run_dir)`, which already named a
    directory of its own in a writable place) that this job may not write: a file, a directory this tool did
    not write, a finished run without `overwrite=true` (or holding files of someone else's), or a `.tmp` beside
    it that is not ours."""
    given = cfg.run_dir
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(
            f"run_dir={given!r} is an existing file, not a directory; give a directory path for the run"
        )
    if final.is_dir() and any(final.iterdir()):
        if not _is_run(final):
            shown = sorted(p.name for p in final.iterdir())
            more = f", ... ({len(shown)} entries)" if len(shown) > 5 else ""
            raise FileExistsError(
                f"run_dir={given!r} is a directory this tool did not write (it holds {', '.join(shown[:5])}"
                f"{more}); choose another run_dir: nothing in it is touched"
            )
        foreign = _foreign(final)
        if foreign:
            raise FileExistsError(
                f"run_dir={given!r} is a finished run, but also holds files this tool did not write "
                f"({', '.join(foreign[:5])}); move them out to replace it, or choose another run_dir"
            )
        if not cfg.overwrite:
            raise FileExistsError(
                f"run_dir={given!r} holds a finished run; pass overwrite=true to replace it, or choose another "
                "run_dir"
            )
    tmp = tmp_dir(final)
    if tmp.exists() and not (tmp.is_dir() and _ours_tmp(tmp)):
        raise FileExistsError(
            f"{str(tmp)!r} exists and was not made by this tool; it is where run_dir={given!r} is assembled: "
            "move it away or choose another run_dir"
        )


@contextlib.contextmanager
def locked(final: Path) -> Iterator[None]:
    """Holds `<run_dir>.lock` while inside: a second job on the same run directory is refused at once, naming
    the holder. The lock is the file's flock, which the operating system releases when the holder exits,
    however it exits, so a crashed job leaves no stale lock: at most the file, which the next job takes over."""
    path = final.with_name(final.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RuntimeError(
                f"run_dir={str(final)!r} is being written by another job ({_holder(text)}; lock {path}): wait "
                "for it to finish, or choose another run_dir"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the last holder removed the file while we opened it: take the new one
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on host {who['host']}, since {who['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


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
        # Checkpoints hold an SAE too, but in the scaled training space: never offered as one.
        inner = sorted(
            p.name for p in path.iterdir() if (p / WEIGHTS).is_file() and not p.name.startswith("checkpoint")
        )
        hint = f"; it holds several SAEs, pass one of its subdirectories: {inner}" if inner else ""
        if interrupted_checkpoint(path) is not None:
            hint = "; it is an unfinished run: finish it with `python train.py ... resume=true`"
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
    if job.data.path == SYNTHETIC:
        raise ValueError(
            f"run_dir={str(path)!r} holds an SAE trained on synthetic activations (data=synthetic): there is no "
            "model or text to analyse it on; its ground-truth metrics are in metrics.json, and "
            "`open_run(..., model=False)` opens the SAE alone"
        )
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
