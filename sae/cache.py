"""Activations on disk: harvest once (by one process or several), train many times, resume an interrupted
harvest, and replay the cached context batches without running the model.

A cache directory holds one manifest, `meta.json` (provenance, the shards, token and batch counts,
`complete`), and shards `shard-<first batch>.safetensors`, each holding some whole context batches:

    acts.<module>   [n, D]  in the model's compute dtype (lossless: the model computed in it)
    contexts.ids    [C, T]  int32, the token ids of the shard's C contexts (`sae.data.Contexts`)
    contexts.row    [C, T]  int64, the dataset row of each position (-1 for an inserted BOS/EOS)
    contexts.pos    [C, T]  int32, the position within the row's tokens (-1 for an inserted BOS/EOS)
    contexts.mask   [C, T]  bool, the text positions
    contexts.used   [C, T]  bool, the positions whose activations are cached (the n rows, in order)
    contexts.batch  [C]     int64, the index of each context's batch in the train stream

The context batches are numbered 0, 1, ... in the order of the stream the harvest reads. A complete cache
holds batches 0..n-1 whole, and the manifest lists for each shard its batches and their token counts, so
`load`, `provenance` and `replay` return them in batch order whatever shards they lie in.

Parallel harvest: with `rank` and `world` (under torchrun), batch i is harvested by rank i % world, which
writes its own shards. The ranks meet after each round (every rank one batch) in a collective that sums
the round's token counts, so all agree where the budget cuts; rank 0 writes the manifest. The cache holds
the same batches, in the same order, however many processes harvested it.

Budget: the cache holds the first n context batches, n the smallest number whose kept tokens reach
`max_tokens` (all of them if the stream runs out first); no batch is cut short.

Resume: each shard is written atomically and only then listed: by rank r in `progress-rank<r>.json` while
it harvests, merged into `meta.json` when a harvest starts and when it ends. A crash never leaves a list
pointing at half a shard, and a resumed harvest (with any number of processes) skips the batches already
cached without running the model.

Reading: `load` and `provenance` return every cached token in batch order; `replay` yields the cached
context batches one at a time, as `harvest.activations` yields them, for an analysis without the model;
`batches` serves shuffled training batches shard by shard (so their order depends on how the tokens were
sharded, which depends on how many processes harvested).

The tokens cached are those `harvest.keep_tokens` keeps (in every module, when there are several), as in
every other harvest, so the rows of all modules and the provenance line up.
"""

import contextlib
import fcntl
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from sae import harvest, stream
from sae.data import Contexts
from sae.files import save_tensors, write_json

META = "meta.json"
_PROGRESS = "progress-rank{}.json"  # a rank's own list of the shards it has written, while it harvests
FORMAT = 2
"""The layout of the shards and the manifest; in the provenance, so a cache of another layout is refused."""
_CONTEXT_KEYS = ("ids", "row", "pos", "mask", "used")


def _shard_name(first_batch: int) -> str:
    # Named by its first context batch: unique however many processes, in however many attempts, harvest.
    return f"shard-{first_batch:08d}.safetensors"


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
    rank: int = 0,
    world: int = 1,
) -> "ActivationCache":
    """Harvests the activations of `modules` at the first context batches of `contexts` whose tokens reach
    `max_tokens` (all of them if `contexts` run out) into `directory`, and returns the complete cache.

    `provenance` describes whatever else changes the activations (model, data, packing), as plain JSON
    values; the modules, the model's dtype, `max_norm_ratio`, `max_tokens` and the cache format are added
    to it. A complete cache with the same provenance is returned as it is; an incomplete one is resumed;
    one with other provenance raises ValueError naming the differences.

    Data-parallel: every one of `world` processes (joined in a torch.distributed process group) calls this
    with its `rank` and the whole stream `contexts`, harvests the batches i with i % world == rank, and
    returns once rank 0 has listed every rank's shards. A shard is flushed after the whole context batch
    that brings this rank's buffer to `shard_tokens`.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} with world={world}; accepted: 0 <= rank < world")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    provenance = provenance | {
        "modules": list(modules),
        "model_dtype": _dtype_name(model.dtype),
        "max_norm_ratio": max_norm_ratio,
        "max_tokens": max_tokens,
        "cache_format": FORMAT,
    }
    provenance = json.loads(json.dumps(provenance))  # compare as it reads back from meta.json
    # Rank 0 holds the lock for the job; the others wait for it in the broadcast (the process group's
    # timeout bounds how long another job may hold the lock).
    with _locked(directory) if rank == 0 else contextlib.nullcontext():
        meta = _from_rank_0(lambda: _start(directory, provenance, shard_tokens), rank, world)
        if not meta["complete"]:
            mine = itertools.islice(contexts, rank, None, world)
            part = _harvest(directory, meta, model, modules, mine, max_tokens, max_norm_ratio, rank, world)
            parts = [part]
            if world > 1:
                parts = [{} for _ in range(world)]
                dist.all_gather_object(parts, part)
            if rank == 0:
                meta["complete"] = True
                _list(directory, meta, parts)
    if world > 1:
        dist.barrier()  # every rank opens the cache rank 0 has just completed
    return ActivationCache(directory)


def _from_rank_0(fn: Callable[[], dict], rank: int, world: int) -> dict:
    """`fn()` run on rank 0 and handed to every rank; an error it raises is raised on every rank, so no
    rank waits in a collective for one that failed."""
    if world == 1:
        return fn()
    message: list[Any] = [None]
    if rank == 0:
        try:
            message[0] = fn()
        except Exception as err:
            message[0] = err
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], Exception):
        raise message[0]
    return message[0]


def _start(directory: Path, provenance: dict, shard_tokens: int) -> dict:
    """The meta of the cache in `directory`: the one there (checked against `provenance`, with the shards
    the ranks of an interrupted harvest listed merged in), or a new one."""
    path = directory / META
    progress = [json.loads(p.read_text()) for p in sorted(directory.glob(_PROGRESS.format("*")))]
    if path.exists():
        meta = json.loads(path.read_text())
        if meta["provenance"] == provenance:
            if not meta["complete"]:
                _list(directory, meta, progress)
            return meta
        if meta["complete"] or meta["shards"] or progress:
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
    _list(directory, meta, [])
    return meta


def _list(directory: Path, meta: dict, parts: list[dict]) -> None:
    """Lists the shards of `parts` (what ranks harvested: their shards, dtype and widths) in `meta` and
    writes it; then deletes the ranks' own lists, and every shard or temporary file meta does not list
    (left by a harvest that stopped before listing it)."""
    for part in parts:
        listed = {s["file"] for s in meta["shards"]}
        meta["shards"] += [s for s in part["shards"] if s["file"] not in listed]
        meta["dtype"] = meta["dtype"] or part["dtype"]
        meta["d_in"] = meta["d_in"] or part["d_in"]
    meta["shards"].sort(key=lambda s: s["batches"][0])
    meta["batches"] = sum(len(s["batches"]) for s in meta["shards"])
    meta["tokens"] = sum(s["tokens"] for s in meta["shards"])
    write_json(directory / META, meta)
    listed = {s["file"] for s in meta["shards"]}
    for pattern in (_PROGRESS.format("*"), "shard-*.safetensors", ".*.tmp*"):
        for stale in directory.glob(pattern):
            if stale.name not in listed:
                stale.unlink()


def _round_counts(count: int, rank: int, world: int) -> list[int]:
    """The kept-token counts of one round's context batches, one per rank in rank order (-1: that rank's
    stream ran out): every rank's own `count`, summed across ranks in a collective when world > 1."""
    if world == 1:
        return [count]
    nccl = dist.get_backend() == "nccl"  # NCCL reduces only tensors on the rank's GPU
    counts = torch.zeros(world, dtype=torch.int64, device=torch.cuda.current_device() if nccl else "cpu")
    counts[rank] = count
    dist.all_reduce(counts)
    return counts.tolist()


def _kept(counts: list[int], total: int, max_tokens: int) -> int:
    """How many of one round's batches (kept-token `counts` in batch order, -1 past the end of the stream)
    the cache keeps after the `total` tokens of the rounds before: up to the one that reaches `max_tokens`."""
    for j, n in enumerate(counts):
        if n < 0:
            return j
        total += n
        if total >= max_tokens:
            return j + 1
    return len(counts)


def _rows(xs: dict[str, torch.Tensor], batch: Contexts, used: torch.Tensor, index: int) -> dict:
    """The shard entries of one context batch: its activations, contexts and used positions."""
    rows = {f"acts.{m}": x.cpu() for m, x in xs.items()}  # [B, D] each
    contexts = {"ids": batch.ids.int(), "row": batch.row.long(), "pos": batch.pos.int(), "mask": batch.mask}
    rows |= {f"contexts.{k}": v for k, v in (contexts | {"used": used}).items()}  # [N, T] each
    return rows | {"contexts.batch": torch.full((len(batch.ids),), index)}  # [N]


def _harvest(
    directory: Path,
    meta: dict,
    model,
    modules: list[str],
    contexts: Iterable[Contexts],
    max_tokens: int,
    max_norm_ratio: float,
    rank: int,
    world: int,
) -> dict:
    """Harvests this rank's context batches `contexts` (batches rank, rank + world, ... of the stream)
    round by round, skipping those `meta` lists without running the model, and flushing a shard whenever
    `shard_tokens` are buffered; returns what it harvested (its shards, dtype and widths)."""
    done = {b: n for s in meta["shards"] for b, n in zip(s["batches"], s["batch_tokens"])}
    part: dict[str, Any] = {"shards": [], "dtype": None, "d_in": {}}
    buffer: list[tuple[int, dict[str, torch.Tensor]]] = []  # (batch index, its rows)
    pending: Future | None = None

    def write(shard: dict[str, torch.Tensor], snapshot: dict) -> None:
        save_tensors(directory / snapshot["shards"][-1]["file"], shard)
        write_json(directory / _PROGRESS.format(rank), snapshot)

    def flush() -> None:
        nonlocal pending
        if buffer:
            shard = {key: torch.cat([t[key] for _, t in buffer]) for key in buffer[0][1]}
            counts = [len(t[f"acts.{modules[0]}"]) for _, t in buffer]
            part["shards"].append(
                {
                    "file": _shard_name(buffer[0][0]),
                    "tokens": sum(counts),
                    "batches": [b for b, _ in buffer],
                    "batch_tokens": counts,
                }
            )
            part["dtype"] = _dtype_name(shard[f"acts.{modules[0]}"].dtype)
            part["d_in"] = {m: shard[f"acts.{m}"].shape[1] for m in modules}
            if pending is not None:
                pending.result()  # one shard in flight at a time, listed in order
            pending = writer.submit(write, shard, json.loads(json.dumps(part)))
        buffer.clear()

    total = 0  # tokens of the batches kept so far, all ranks'
    # Packing runs ahead in one thread and the shards are written in another, both beside the forward.
    with (
        ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as writer,
        contextlib.closing(stream.prefetch(contexts)) as batches,
        tqdm(total=max_tokens, desc="harvest", unit="tok", unit_scale=True, disable=rank != 0) as bar,
    ):
        for r in itertools.count():
            index, batch, rows = r * world + rank, next(batches, None), None
            if batch is None:
                count = -1
            elif index in done:
                count = done[index]
            else:
                xs, used = harvest.capture_kept(model, modules, batch, max_norm_ratio)  # [B, D] each
                rows, count = _rows(xs, batch, used, index), int(used.sum())
            counts = _round_counts(count, rank, world)
            kept = _kept(counts, total, max_tokens)
            if rows is not None and rank < kept:
                buffer.append((index, rows))
            total += sum(counts[:kept])
            bar.update(sum(counts[:kept]))
            if kept < world or total >= max_tokens:
                break
            if sum(len(t[f"acts.{modules[0]}"]) for _, t in buffer) >= meta["shard_tokens"]:
                flush()
        flush()
        if pending is not None:
            pending.result()
    return part


class ActivationCache:
    """A complete activation cache on disk (see the module docstring), read shard by shard."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / META
        if not path.exists():
            raise FileNotFoundError(f"{self.dir} holds no activation cache: {path} does not exist")
        self.meta: dict = json.loads(path.read_text())
        """meta.json: provenance, dtype, d_in per module, shards and token and batch counts."""
        layout = self.meta["provenance"].get("cache_format")
        if layout != FORMAT:
            raise ValueError(
                f"activation cache {self.dir} has format {layout!r}, not the format {FORMAT} this version "
                f"reads; harvest it again into another cache directory, or delete {self.dir}"
            )
        if not self.meta["complete"]:
            progress = [json.loads(p.read_text()) for p in self.dir.glob(_PROGRESS.format("*"))]
            tokens = self.meta["tokens"] + sum(s["tokens"] for p in progress for s in p["shards"])
            raise ValueError(
                f"activation cache {self.dir} is incomplete: its harvest was interrupted after {tokens} "
                "tokens. Run the same command again (same model, hooks, data and harvest settings) to "
                "resume it"
            )
        self._at: dict[int, tuple[int, int, int]] = {}
        """Context batch -> (its shard, its first row there, its tokens)."""
        for i, shard in enumerate(self.meta["shards"]):
            first = 0
            for b, n in zip(shard["batches"], shard["batch_tokens"]):
                self._at[b] = (i, first, n)
                first += n
        if sorted(self._at) != list(range(self.n_batches)):
            raise ValueError(
                f"activation cache {self.dir} lists {len(self._at)} context batches, not batches 0.."
                f"{self.n_batches - 1}; delete {self.dir} and harvest again"
            )
        counts = torch.tensor([self._at[b][2] for b in range(self.n_batches)], dtype=torch.int64)
        self._first = (counts.cumsum(0) - counts).tolist()
        """The first row of each context batch in `load`, in batch order."""
        for i in range(len(self.meta["shards"])):
            self._check(i)

    @property
    def tokens(self) -> int:
        """Tokens in the cache (N)."""
        return self.meta["tokens"]

    @property
    def n_batches(self) -> int:
        """Context batches in the cache, all whole: batches 0..n_batches-1 of the stream harvested."""
        return self.meta["batches"]

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
        contexts = shapes.get("contexts.ids", [0, 0])  # [C, T]
        expected = {f"acts.{m}": [n, d] for m, d in self.meta["d_in"].items()}
        expected |= {f"contexts.{key}": contexts for key in _CONTEXT_KEYS}
        expected |= {"contexts.batch": contexts[:1]}
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

    def _place(self, out: torch.Tensor, i: int, x: torch.Tensor) -> None:
        """Copies the per-token rows x [n, ...] of shard i into out [N, ...], each batch at its place."""
        shard, at = self.meta["shards"][i], 0
        for b, n in zip(shard["batches"], shard["batch_tokens"]):
            out[self._first[b] : self._first[b] + n] = x[at : at + n]
            at += n

    def load(self, module: str) -> torch.Tensor:
        """All activations [N, D] of `module` as float32, in batch order (as one process harvests them)."""
        key = self._key(module)
        out = torch.empty(self.tokens, self.meta["d_in"][module])  # [N, D]
        for i in range(len(self.meta["shards"])):
            self._place(out, i, self._read(i, key))
        return out

    def provenance(self) -> dict[str, torch.Tensor]:
        """`token_id`, `row` and `pos` [N] of every cached token, aligned with `load`."""
        out = {
            "token_id": torch.empty(self.tokens, dtype=torch.int32),
            "row": torch.empty(self.tokens, dtype=torch.int64),
            "pos": torch.empty(self.tokens, dtype=torch.int32),
        }
        for i in range(len(self.meta["shards"])):
            with safe_open(str(self._path(i)), framework="pt") as f:
                used = f.get_tensor("contexts.used")  # [C, T]
                for key, name in (("token_id", "ids"), ("row", "row"), ("pos", "pos")):
                    self._place(out[key], i, f.get_tensor(f"contexts.{name}")[used])
        return out

    def replay(
        self, module: str, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[int, torch.Tensor, Contexts, torch.Tensor]]:
        """Yields (batch index, x [B, D] float32, its contexts [N, T], used [N, T]) for each cached context
        batch whose index % world == rank, in increasing order: what `harvest.activations` yields for that
        batch, without running the model (`used` marks the tokens kept in every cached module, the
        positions the B rows of x come from). Reads one context batch at a time."""
        key = self._key(module)
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} with world={world}; accepted: 0 <= rank < world")
        for b in range(rank, self.n_batches, world):
            i, first, n = self._at[b]
            with safe_open(str(self._path(i)), framework="pt") as f:
                where = (f.get_tensor("contexts.batch") == b).nonzero()[:, 0]  # its contexts: one run
                rows = slice(int(where[0]), int(where[-1]) + 1)
                x = f.get_slice(key)[first : first + n].float()  # [B, D]
                c = {k: f.get_slice(f"contexts.{k}")[rows] for k in _CONTEXT_KEYS}  # [N, T] each
            contexts = Contexts(ids=c["ids"].long(), row=c["row"], pos=c["pos"].long(), mask=c["mask"])
            yield b, x, contexts, c["used"]

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
