"""Resumable streams of activation batches: the token-level shuffle buffer, passes over in-memory tokens, and
a background prefetch, each able to save its position (`state()`) and continue from it (`restore()`).

Harvest produces them and training consumes them; both import this module, neither the other.
"""

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


def is_resumable(items: object) -> bool:
    """Whether `items` can save and restore its position (`state()`/`restore()`; a `Prefetch` says)."""
    return getattr(items, "resumable", hasattr(items, "state") and hasattr(items, "restore"))


class Stream:
    """An iterator of [B, D] batches whose position can be saved and resumed: `state()` is a flat dict (JSON
    values and tensors) describing the position after the last batch served, and `restore(state)`, called
    before iterating, continues from it with the very batches that would have come next. Subclasses write
    the batches in `_run()`."""

    _it: Iterator[torch.Tensor] | None = None

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _run(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def _unstarted(self) -> None:
        if self._it is not None:
            raise RuntimeError("restore() must come before iterating")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._run()
        return next(self._it)


class Shuffled(Stream):
    """Token-level shuffle of a stream of [B, D] chunks into [batch_size, D] batches, resumable.

    Fills a buffer of about `capacity` tokens, permutes it, emits half and keeps the other half to mix with
    what comes next, so each batch draws on many contexts and documents. A remainder smaller than one batch
    at the end is dropped. `chunks(start)` yields the source's chunks from chunk `start` on (a resumed
    stream restarts its source there); `state()` is the position after the last batch served: the buffer's
    tokens still to serve or keep, the chunks consumed and the generator, so `restore(state)` continues
    exactly where that batch left off.
    """

    def __init__(
        self,
        chunks: Callable[[int], Iterable[torch.Tensor]],
        capacity: int,
        batch_size: int,
        generator: torch.Generator,
    ):
        self.chunks, self.capacity, self.batch_size, self.generator = chunks, capacity, batch_size, generator
        # Permuted tokens: the next `_to_emit` batches, then those kept to mix with what comes next.
        self._rest: torch.Tensor | None = None
        self._to_emit = 0
        self._final = False  # the source ended: serve the rest and stop
        self._consumed = 0  # source chunks consumed

    def state(self) -> dict[str, Any]:
        rest = self._rest if self._rest is not None else torch.zeros(0)
        return {
            "consumed": self._consumed,
            "to_emit": self._to_emit,
            "final": self._final,
            "rest": rest,
            "generator": self.generator.get_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._unstarted()
        self._consumed, self._to_emit, self._final = state["consumed"], state["to_emit"], state["final"]
        self._rest = state["rest"] if state["rest"].dim() == 2 else None
        self.generator.set_state(state["generator"])

    def _permute(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        device = chunks[-1].device
        buf = torch.cat([c.to(device) for c in chunks])
        return buf[torch.randperm(len(buf), generator=self.generator, device="cpu").to(device)]

    def _run(self) -> Iterator[torch.Tensor]:
        B = self.batch_size
        source: Iterator[torch.Tensor] | None = None
        while True:
            while self._to_emit:
                assert self._rest is not None
                batch, self._rest = self._rest[:B], self._rest[B:]
                self._to_emit -= 1
                yield batch
            if self._final:
                return
            if source is None:
                source = iter(self.chunks(self._consumed))
            chunks = [self._rest] if self._rest is not None and len(self._rest) else []
            size = sum(len(c) for c in chunks)
            for x in source:
                chunks.append(x)
                size += len(x)
                self._consumed += 1
                if size >= self.capacity:
                    break
            else:
                self._final = True
            if not chunks:
                return
            self._rest = self._permute(chunks)
            # Half of a full buffer goes out (whole batches), the other half stays to mix with what comes next.
            self._to_emit = len(self._rest) // B if self._final else len(self._rest) // 2 // B


class Epochs(Stream):
    """Shuffled [batch_size, D] batches drawn from in-memory tokens x [B, D], pass after pass, until `tokens`;
    resumable like `Shuffled` (its state: the generator before this pass's permutation, the offset into it
    and the tokens served)."""

    def __init__(self, x: torch.Tensor, batch_size: int, tokens: int, generator: torch.Generator):
        if len(x) < batch_size:
            raise ValueError(
                f"only {len(x)} tokens were harvested, fewer than one batch of train.batch_size={batch_size}; "
                "raise train.harvest_tokens or lower train.batch_size"
            )
        self.x, self.batch_size, self.tokens, self.generator = x, batch_size, tokens, generator
        self._pass_generator: torch.Tensor | None = None  # the generator before this pass's permutation
        self._offset = self._served = 0

    def state(self) -> dict[str, Any]:
        before = self._pass_generator if self._pass_generator is not None else self.generator.get_state()
        return {
            "generator": before,
            "offset": self._offset,
            "served": self._served,
            "in_pass": self._pass_generator is not None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._unstarted()
        self.generator.set_state(state["generator"])
        self._offset, self._served = state["offset"], state["served"]
        self._pass_generator = state["generator"] if state["in_pass"] else None

    def _run(self) -> Iterator[torch.Tensor]:
        x, B = self.x, self.batch_size
        while self._served < self.tokens:
            if self._pass_generator is None:
                self._pass_generator = self.generator.get_state()
            else:  # resumed mid-pass: draw this pass's permutation again
                self.generator.set_state(self._pass_generator)
            perm = torch.randperm(len(x), generator=self.generator, device="cpu").to(x.device)
            while self._offset + B <= len(x):
                batch = x[perm[self._offset : self._offset + B]].float()
                self._offset += B
                self._served += B
                yield batch
                if self._served >= self.tokens:
                    return
            self._pass_generator, self._offset = None, 0


class Prefetch(Generic[T]):
    """Iterates `items` in a background thread up to `depth` items ahead, so producing the next item (a model
    forward, a shard read) overlaps consuming this one; torch releases the GIL inside its kernels. An
    exception in the producer is raised here; `close()` stops the producer.

    If `items` is resumable (`state()`/`restore()`, as `Shuffled` and `Epochs`), so is this: the producer
    takes the state after each item it makes, and `state()` here is the one that came with the last item
    consumed, however far ahead the producer is.
    """

    def __init__(self, items: Iterable[T], depth: int = 2):
        self.items, self.depth = items, depth
        self.resumable = is_resumable(items)
        self._state: dict[str, Any] | None = None
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False

    def state(self) -> dict[str, Any] | None:
        return self._state

    def restore(self, state: dict[str, Any]) -> None:
        self.items.restore(state)  # type: ignore[attr-defined]

    def __iter__(self) -> "Prefetch[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        if self._thread is None:
            # The thread holds no reference to this object, so one dropped without close() is collected
            # and its __del__ stops the producer.
            args = (self.items, self.resumable, self._q, self._stop)
            self._thread = threading.Thread(target=_produce, args=args, daemon=True, name="prefetch")
            self._thread.start()
        error, item, state = self._q.get()
        if error is not None:
            self.close()
            raise error
        if item is _DONE:
            self.close()
            raise StopIteration
        self._state = state
        return item

    def close(self) -> None:
        """Stops the producer and waits for it."""
        self._done = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __del__(self) -> None:
        self._stop.set()


_DONE = object()


def _produce(items: Iterable, resumable: bool, q: queue.Queue, stop: threading.Event) -> None:
    """`Prefetch`'s producer: puts (error, item, state after it) into `q` until `items` ends or `stop` is set."""

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put((None, item, items.state() if resumable else None)):  # type: ignore[attr-defined]
                return
    except BaseException as e:  # handed to the consumer
        put((e, None, None))
        return
    put((None, _DONE, None))


def shuffled(
    stream: Iterable[torch.Tensor], capacity: int, batch_size: int, generator: torch.Generator
) -> Shuffled:
    """`Shuffled` over a one-pass stream of [B, D] chunks."""
    it = iter(stream)
    return Shuffled(lambda start: itertools.islice(it, start, None), capacity, batch_size, generator)


def epochs(x: torch.Tensor, batch_size: int, tokens: int, generator: torch.Generator) -> Epochs:
    """`Epochs`: shuffled batches of in-memory tokens x [B, D], pass after pass, until `tokens`."""
    return Epochs(x, batch_size, tokens, generator)


def prefetch(items: Iterable[T], depth: int = 2) -> "Prefetch[T]":
    """`Prefetch`: iterates `items` in a background thread up to `depth` items ahead."""
    return Prefetch(items, depth)
