"""Training checkpoints, written whole and found again after any crash.

A checkpoint directory holds everything the next step depends on, so a resumed run continues bit-exactly:
  sae.safetensors, cfg.json   the SAE in the scaled input space
  optimizer.safetensors       Adam's moments and step count per parameter
  loop.safetensors            per-latent counters (tokens since each fired, firings since the last log and
                              evaluation), the dead latents AuxK uses, the torch RNG states
  stream-rank<R>.*            rank R's data position: its shuffle buffer's tokens, generator and source
                              position (`state()` of a resumable batch stream), as safetensors + JSON
  state.json                  step, tokens, input scale, window counters, world size; written last
It is assembled in `<dir>.new` and swapped in by renames, so a crash at any moment leaves either the old or
the new checkpoint whole (`<dir>.old` is the old one for the instant between the two renames).
"""

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sae.files import load_tensors, read_json, save_tensors, write_json
from sae.model import SAE


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A flat state dict as (its JSON values, its tensors)."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    return {k: v for k, v in state.items() if k not in tensors}, tensors


def _save_stream(path: Path, rank: int, state: dict[str, Any]) -> None:
    values, tensors = split_state(state)
    save_tensors(path / f"stream-rank{rank}.safetensors", tensors)
    write_json(path / f"stream-rank{rank}.json", values)


def _sync(directory: Path) -> None:
    """fsyncs the files in `directory`, then the directory itself (its entries)."""
    for item in [*directory.iterdir(), directory]:
        if item.is_dir() and item != directory:
            continue
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def save_checkpoint(
    sae: SAE,
    opt: torch.optim.Optimizer,
    state: dict,
    path: Path,
    loop: dict[str, torch.Tensor] | None = None,
    stream: dict[str, Any] | None = None,
    rank: int = 0,
    world: int = 1,
) -> None:
    """Writes the checkpoint directory `path` (layout above) as a whole: every rank its stream state, rank 0
    the rest, then rank 0 swaps it in."""
    path = Path(path)
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
    _barrier(world)
    if stream is not None:
        _save_stream(new, rank, stream)
    _barrier(world)
    if rank == 0:
        sae.save(new)
        moments = {}
        for name, p in sae.named_parameters():
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    moments[f"{name}.{key}"] = value.float()
        save_tensors(new / "optimizer.safetensors", moments)
        if loop is not None:
            save_tensors(new / "loop.safetensors", loop)
        write_json(new / "state.json", state | {"world": world, "stream": stream is not None})
        _sync(new)  # on disk before the renames, so a machine crash cannot leave renamed, unwritten files
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        new.rename(path)
        _sync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint at `path` (or the old one a crash between the swap's renames left), or None."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


STATE_KEYS = ("step", "tokens", "input_scale", "world", "stream")


def read_checkpoint_state(path: Path, world: int = 1) -> dict:
    """The state.json of checkpoint `path`, checked to hold every key and to come from `world` processes."""
    state = read_json(path / "state.json", "checkpoint state")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state {path / 'state.json'} lacks {missing}; it holds {sorted(state)}")
    if state["world"] != world:
        raise ValueError(
            f"checkpoint {path} was written by {state['world']} data-parallel processes, but this run has "
            f"{world}; resume it with the same number (torchrun --nproc_per_node={state['world']})"
        )
    return state


def load_stream_state(path: Path, rank: int = 0) -> dict[str, Any]:
    """Rank `rank`'s stream state in checkpoint `path`, for the stream's `restore()`."""
    values = read_json(path / f"stream-rank{rank}.json", f"checkpoint stream state of rank {rank}")
    return values | load_tensors(
        path / f"stream-rank{rank}.safetensors", f"checkpoint stream file of rank {rank}"
    )


def load_checkpoint(path: Path, sae: SAE, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Loads checkpoint `path` into `sae` (scaled space) and `opt`; returns its loop tensors. Anything
    missing, truncated, corrupt or not matching this SAE raises an error naming the file."""
    saved = SAE.load(path)
    if saved.config() != sae.config():
        raise ValueError(
            f"checkpoint {path} holds an SAE {saved.config()}, but this run trains {sae.config()}"
        )
    sae.load_state_dict(saved.state_dict())
    device = next(sae.parameters()).device
    moments = load_tensors(path / "optimizer.safetensors", "checkpoint optimizer file")
    for name, p in sae.named_parameters():
        slot = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            value = moments.get(f"{name}.{key}")
            expected = () if key == "step" else tuple(p.shape)
            if value is None or tuple(value.shape) != expected:
                got = "missing" if value is None else f"of shape {list(value.shape)}"
                raise ValueError(
                    f"checkpoint optimizer file {path / 'optimizer.safetensors'}: {name}.{key} is {got}, "
                    f"expected shape {list(expected)}"
                )
            slot[key] = value.to(device)
        opt.state[p] = slot
    loop = load_tensors(path / "loop.safetensors", "checkpoint loop file")
    for key in ("since_fired", "window", "eval_window", "dead", "rng.cpu"):
        ok = key in loop and (key in ("dead", "rng.cpu") or tuple(loop[key].shape) == (sae.d_sae,))
        if not ok:
            raise ValueError(
                f"checkpoint loop file {path / 'loop.safetensors'}: {key} is missing or not of shape "
                f"[{sae.d_sae}]; it holds {sorted(loop)}"
            )
    return loop
