"""Activations on disk: harvest once, train many times, and resume an interrupted harvest.

A cache directory holds `meta.json` (provenance, shard list, `complete`) and shards
`shard-00000.safetensors`, ... with

    acts.<module>  [n, D]  in the model's compute dtype (lossless: the model computed in it)
    token_id       [n]     int32
    row            [n]     int64, the dataset row
    pos            [n]     int32, the position within the row's tokens

Each shard is written atomically and only then listed in `meta.json` (also atomic), so a crash never leaves
meta pointing at half a shard. A shard ends after a whole context batch, and meta records how many context
batches were consumed by then: a resumed harvest skips those batches without running the model.

The tokens cached are those `harvest.keep_tokens` keeps (in every module, when there are several), as in
every other harvest, so the rows of all modules and the provenance line up.
"""

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from sae import harvest, stream
from sae.data import Contexts
from sae.files import save_tensors, write_json

META = "meta.json"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """A line for each key whose value differs between `old` and `new`, nested keys as `outer.inner`."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the cache, {b!r} now")
    return out


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Holds an exclusive lock on `directory`, so parallel jobs harvest into it one after the other."""
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process harvesting into {directory}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_cache(
    directory: str | Path,
    model,
    modules: list[str],
    contexts: Iterable[Contexts],
    max_tokens: int,
    max_norm_ratio: float,
    provenance: dict,
    shard_tokens: int = 2**16,
) -> "ActivationCache":
    """Harvests `max_tokens` activations of `modules` (fewer if `contexts` run out) into `directory` and
    returns the cache.

    `provenance` describes whatever else changes the activations (model, data, packing), as plain JSON
    values; the modules, the model's dtype, `max_norm_ratio` and `max_tokens` are added to it. A complete
    cache with the same provenance is returned as it is; an incomplete one is resumed; one with other
    provenance raises ValueError naming the differences.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    provenance = provenance | {
        "modules": list(modules),
        "model_dtype": _dtype_name(model.dtype),
        "max_norm_ratio": max_norm_ratio,
        "max_tokens": max_tokens,
    }
    provenance = json.loads(json.dumps(provenance))  # compare as it reads back from meta.json
    with _locked(directory):
        meta = _start(directory, provenance, shard_tokens)
        if not meta["complete"]:
            _harvest(directory, meta, model, modules, contexts, max_tokens, max_norm_ratio)
    return ActivationCache(directory)


def _start(directory: Path, provenance: dict, shard_tokens: int) -> dict:
    """The meta of the cache in `directory`: the one there (checked against `provenance`), or a new one."""
    path = directory / META
    if path.exists():
        meta = json.loads(path.read_text())
        if meta["provenance"] == provenance:
            return meta
        if meta["complete"] or meta["shards"]:
            raise ValueError(
                f"activation cache {directory} was harvested with other settings ("
                + "; ".join(_differences(meta["provenance"], provenance))
                + f"); choose another cache directory or delete {directory}"
            )
    elif {p.name for p in directory.iterdir()} - {".lock"}:
        raise ValueError(
            f"{directory} is not empty and holds no {META}: it is not an activation cache; choose another "
            "cache directory"
        )
    meta = {
        "provenance": provenance,
        "dtype": None,
        "d_in": {},
        "shard_tokens": shard_tokens,
        "shards": [],
        "batches": 0,
        "tokens": 0,
        "complete": False,
    }
    write_json(path, meta)
    return meta


def _harvest(
    directory: Path,
    meta: dict,
    model,
    modules: list[str],
    contexts: Iterable[Contexts],
    max_tokens: int,
    max_norm_ratio: float,
) -> None:
    """Continues the harvest `meta` describes: skips the context batches already cached, then captures the
    rest, flushing a shard whenever `shard_tokens` are buffered."""
    listed = {s["file"] for s in meta["shards"]}
    for stale in [*directory.glob("shard-*.safetensors"), *directory.glob(".*.tmp*")]:
        if stale.name not in listed:  # left by a harvest that stopped before listing it
            stale.unlink()
    skip, total = meta["batches"], meta["tokens"]
    buffer: list[dict[str, torch.Tensor]] = []
    buffered = 0
    pending: Future | None = None

    def write(shard: dict[str, torch.Tensor], snapshot: dict) -> None:
        save_tensors(directory / snapshot["shards"][-1]["file"], shard)
        write_json(directory / META, snapshot)

    def flush() -> None:
        nonlocal buffer, buffered, pending
        if buffer:
            shard = {key: torch.cat([b[key] for b in buffer]) for key in buffer[0]}
            meta["shards"].append(
                {"file": _shard_name(len(meta["shards"])), "tokens": buffered, "batches": meta["batches"]}
            )
            meta["tokens"] += buffered
            meta["dtype"] = _dtype_name(shard[f"acts.{modules[0]}"].dtype)
            meta["d_in"] = {m: shard[f"acts.{m}"].shape[1] for m in modules}
            if pending is not None:
                pending.result()  # one shard in flight at a time, listed in order
            pending = writer.submit(write, shard, json.loads(json.dumps(meta)))
        buffer, buffered = [], 0

    # Packing runs ahead in one thread and the shards are written in another, both beside the forward.
    with (
        ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as writer,
        contextlib.closing(stream.prefetch(contexts)) as batches,
        tqdm(total=max_tokens, initial=total, desc="harvest", unit="tok", unit_scale=True) as bar,
    ):
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            xs, used = harvest.capture_kept(model, modules, batch, max_norm_ratio)  # [B, D] each
            n = min(len(xs[modules[0]]), max_tokens - total)
            rows = {f"acts.{m}": x[:n].cpu() for m, x in xs.items()}
            for key, value, dtype in (
                ("token_id", batch.ids, torch.int32),
                ("row", batch.row, torch.int64),
                ("pos", batch.pos, torch.int32),
            ):
                rows[key] = value[used][:n].to(dtype)
            buffer.append(rows)
            buffered += n
            total += n
            meta["batches"] = i + 1
            bar.update(n)
            if total >= max_tokens:
                break
            if buffered >= meta["shard_tokens"]:
                flush()
        flush()
        if pending is not None:
            pending.result()
        meta["complete"] = True
        write_json(directory / META, meta)


class ActivationCache:
    """A complete activation cache on disk (see the module docstring), read shard by shard."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / META
        if not path.exists():
            raise FileNotFoundError(f"{self.dir} holds no activation cache: {path} does not exist")
        self.meta: dict = json.loads(path.read_text())
        """meta.json: provenance, dtype, d_in per module, shards and token counts."""
        if not self.meta["complete"]:
            raise ValueError(
                f"activation cache {self.dir} is incomplete: its harvest was interrupted after "
                f"{self.meta['tokens']} tokens. Run the same command again (same model, hooks, data and "
                "harvest settings) to resume it"
            )
        for i in range(len(self.meta["shards"])):
            self._check(i)

    @property
    def tokens(self) -> int:
        """Tokens in the cache (N)."""
        return self.meta["tokens"]

    @property
    def modules(self) -> list[str]:
        """The cached modules, by path."""
        return self.meta["provenance"]["modules"]

    def _path(self, i: int) -> Path:
        return self.dir / self.meta["shards"][i]["file"]

    def _check(self, i: int) -> None:
        """Raises if shard i is missing, truncated, or not the size meta.json says."""
        path, n = self._path(i), self.meta["shards"][i]["tokens"]
        if not path.exists():
            raise FileNotFoundError(
                f"activation cache shard {path} is missing; delete {self.dir} and harvest again"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except SafetensorError as err:
            raise ValueError(
                f"activation cache shard {path} is corrupt ({err}); delete {self.dir} and harvest again"
            ) from None
        expected = {f"acts.{m}": [n, d] for m, d in self.meta["d_in"].items()}
        expected |= {key: [n] for key in ("token_id", "row", "pos")}
        if shapes != expected:
            raise ValueError(
                f"activation cache shard {path} holds {shapes}, not the {expected} {META} lists; delete "
                f"{self.dir} and harvest again"
            )

    def _read(self, i: int, key: str) -> torch.Tensor:
        with safe_open(str(self._path(i)), framework="pt") as f:
            return f.get_tensor(key)

    def _key(self, module: str) -> str:
        if module not in self.modules:
            raise ValueError(
                f"module {module!r} is not in activation cache {self.dir}; it holds {self.modules}"
            )
        return f"acts.{module}"

    def load(self, module: str) -> torch.Tensor:
        """All activations [N, D] of `module` as float32, in harvest order."""
        key = self._key(module)
        out = torch.empty(self.tokens, self.meta["d_in"][module])  # [N, D]
        start = 0
        for i, shard in enumerate(self.meta["shards"]):
            out[start : start + shard["tokens"]] = self._read(i, key)
            start += shard["tokens"]
        return out

    def provenance(self) -> dict[str, torch.Tensor]:
        """`token_id`, `row` and `pos` [N] of every cached token, aligned with `load`."""
        shards = range(len(self.meta["shards"]))
        return {key: torch.cat([self._read(i, key) for i in shards]) for key in ("token_id", "row", "pos")}

    def batches(
        self,
        module: str,
        batch_size: int,
        tokens: int,
        generator: torch.Generator,
        buffer_tokens: int = 2**18,
        shard: tuple[int, int] = (0, 1),
    ) -> "CacheBatches":
        """Shuffled float32 batches [batch_size, D] of `module`, pass after pass over the cache, until
        `tokens` were served; resumable (`CacheBatches`).

        Each pass reads the shards in a random order through a shuffle buffer of about `buffer_tokens`
        tokens (`stream.Shuffled`), so memory stays bounded however large the cache. Within a pass each
        token is served at most once: all but fewer than `batch_size` of them. `shard=(rank, world)` serves
        one data-parallel rank its share: every world-th shard from the rank-th on, or, in a cache of fewer
        shards than ranks, every world-th token of each shard.
        """
        key = self._key(module)
        rank, world = shard
        counts = [s["tokens"] for s in self.meta["shards"]]
        if len(counts) >= world:
            shards, rows = list(range(len(counts)))[rank::world], slice(None)
        else:
            shards, rows = list(range(len(counts))), slice(rank, None, world)
        held = sum(len(range(counts[i])[rows]) for i in shards)
        if held < batch_size:
            part = f" (rank {rank}'s share of {world})" if world > 1 else ""
            raise ValueError(
                f"activation cache {self.dir} holds {held} tokens{part}, fewer than one batch of {batch_size}"
            )
        return CacheBatches(
            lambda i: self._read(i, key)[rows].float(), shards, batch_size, tokens, generator, buffer_tokens
        )


class CacheBatches(stream.Stream):
    """The batches of `ActivationCache.batches`, resumable: `state()` is the position after the last batch
    served (this pass's shard order, the shuffle buffer's state, tokens served), `restore(state)` continues
    from it."""

    def __init__(
        self,
        read: Callable[[int], torch.Tensor],
        shards: list[int],
        batch_size: int,
        tokens: int,
        generator: torch.Generator,
        buffer_tokens: int,
    ):
        self.read, self.shards, self.batch_size, self.tokens = read, shards, batch_size, tokens
        self.generator, self.buffer_tokens = generator, buffer_tokens
        self._order: list[int] | None = None  # this pass's shards, in reading order
        self._pass: stream.Shuffled | None = None
        self._served = 0

    def _new_pass(self, order: list[int]) -> stream.Shuffled:
        self._order = order
        chunks = lambda start: (self.read(i) for i in order[start:])  # noqa: E731
        return stream.Shuffled(chunks, self.buffer_tokens, self.batch_size, self.generator)

    def state(self) -> dict[str, Any]:
        inner = self._pass.state() if self._pass is not None else {}
        return {"order": self._order, "served": self._served} | {f"pass.{k}": v for k, v in inner.items()}

    def restore(self, state: dict[str, Any]) -> None:
        self._unstarted()
        self._served = state["served"]
        if state["order"] is not None:  # the pass's generator is this one: its restore sets it
            self._pass = self._new_pass(state["order"])
            self._pass.restore(
                {k.removeprefix("pass."): v for k, v in state.items() if k.startswith("pass.")}
            )

    def _run(self) -> Iterator[torch.Tensor]:
        while True:
            if self._pass is None:
                perm = torch.randperm(len(self.shards), generator=self.generator).tolist()
                self._pass = self._new_pass([self.shards[i] for i in perm])
            for x in self._pass:
                self._served += len(x)
                yield x
                if self._served >= self.tokens:
                    return
            self._pass = None
