"""Atomic writes: every artifact is written to a temporary file beside its target and renamed onto it, so a
reader (or a crash) never sees half a file."""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Calls `write(tmp)` for a temporary path in `path`'s directory, then renames it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically."""
    return atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, value) -> Path:
    """Writes `value` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(value, indent=2))


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Writes named tensors (and string `metadata`) as safetensors to `path` atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: str | Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """The named tensors of safetensors file `path`; a missing, truncated or corrupt file raises an error
    naming it (`what` says what the file is, e.g. "SAE weights file")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{what} {path} is truncated or corrupt ({err})") from None


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    """The JSON object in `path`; a missing, truncated or malformed file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is truncated or corrupt: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(value).__name__}, not an object")
    return value
