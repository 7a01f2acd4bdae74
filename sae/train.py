"""`train(cfg, activations) -> SAE`: the training loop, one recipe for every architecture.

- Inputs are scaled so their mean norm is sqrt(D) (Anthropic's April 2024 update; it makes coefficients
  and the JumpReLU bandwidth transferable across models and layers); the scale is folded into the returned
  SAE, which takes raw activations.
- Loss: the batch FVU plus each architecture's terms (`SAE.step`): AuxK for the TopK family (Gao et al. 2024,
  appendix A.2), an L0 penalty for JumpReLU, a decoder-norm-weighted L1 for ReLU, whose coefficients warm up
  linearly over `sparsity_warmup` of the steps.
- Adam with eps 6.25e-10 (Gao et al.); learning rate from the width (`default_lr`), linear warm-up, linear
  decay to zero over the last `decay_fraction` of steps (Conerly et al. 2024); gradient norm clipped.
- Decoder rows at unit norm with the parallel gradient removed (all but `relu`); b_dec starts at the
  geometric median of the first batch.
- A latent is dead after `dead_tokens` tokens without firing (counted in tokens, not steps).
"""

import contextlib
import ctypes
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_stream_state,
    read_checkpoint_state,
    save_checkpoint,
)
from sae.config import SAEConfig, TrainConfig
from sae.devices import resolve_dtype
from sae.model import SAE, read_config
from sae.stream import is_resumable

# Sparsity coefficients in FVU units for SmolLM2-135M block 15 (4608 latents). At 400k tokens: jumprelu 1.5e-3
# -> L0 84, 5e-3 -> L0 35; relu 6e-4 -> L0 1295, 0.015 -> L0 33. Codes keep getting sparser with longer
# training: at the demo's 2.5M tokens jumprelu 5e-3 -> L0 14, 2e-3 -> L0 39, and relu 0.015 -> L0 10.
DEFAULT_SPARSITY = {"jumprelu": 2e-3, "relu": 0.015}
DENSE = 0.1  # a latent firing on more than this fraction of tokens counts as dense

Logger = Callable[[dict, int], None]
Evaluate = Callable[[Callable[[torch.Tensor], torch.Tensor]], dict]


class TrainingDiverged(FloatingPointError):
    """The loss or the weights stopped being finite. `checkpoint`: the directory holding the last checkpoint
    written before that (all of whose weights were finite), or None."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the SAE's large matmuls for `train.precision` (`auto`: bf16 where the hardware runs it
    natively, as for the model)."""
    if name == "auto":
        return resolve_dtype("auto", device)
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def keep_freed_memory() -> None:
    """Asks glibc's allocator to keep freed memory for reuse (no-op elsewhere).

    By default glibc returns large freed blocks to the OS, so every training step's [F, D]-sized temporaries
    (gradients, optimizer scratch) are mapped again and page-faulted in: about 15% of a CPU training step
    for a 4608 x 576 SAE. Larger blocks (activation sets, logits) are still returned to the OS.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap...
    libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)  # ...which keeps up to 512 MiB free for reuse


def default_lr(d_sae: int) -> float:
    """1e-3 at 2**14 latents, scaled as 1/sqrt(d_sae) as in Gao et al. 2024 (sec. 2.1).

    Their constant, 2e-4, suits runs of billions of tokens. Runs of a few million tokens need a faster
    rate: on SmolLM2-135M block 15 (4608 latents, k 32, batches of 1024, 600k tokens) held-out FVU was
    0.43 at Gao's rate, 0.26 at 1e-3, 0.23 at 2e-3, and 0.23 with 18% dead latents at 4e-3.
    """
    return 1e-3 / math.sqrt(d_sae / 2**14)


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to the rows of x [B, D] (Weiszfeld's algorithm)."""
    m = x.mean(dim=0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (new - m).norm() < eps * m.norm().clamp_min(1.0):
            return new
        m = new
    return m


def lr_factor(step: int, steps: int, warmup: int, decay_fraction: float) -> float:
    """Learning-rate multiplier: linear warm-up, constant, then linear decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(steps * (1 - decay_fraction))
    if step >= decay_start and steps > decay_start:
        return max(0.0, (steps - step) / (steps - decay_start))
    return 1.0


def build(sae_cfg: SAEConfig, d_in: int, seed: int = 0) -> SAE:
    """The untrained SAE a config describes, for activations of width d_in."""
    d_sae = sae_cfg.expansion_factor * d_in
    prefixes = tuple(sorted({max(1, round(f * d_sae)) for f in sae_cfg.prefixes}))
    return SAE(d_in, d_sae, sae_cfg.k, arch=sae_cfg.arch, prefixes=prefixes, bandwidth=sae_cfg.bandwidth,
               threshold_init=sae_cfg.threshold_init, seed=seed)  # fmt: skip


class Interrupted(Exception):
    """One of the `STOP_SIGNALS` stopped training at a step boundary, after a checkpoint was written there."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: training stopped after step {step}; its checkpoint is in {checkpoint}"
        )
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
"""Signals that stop training after a checkpoint: SLURM's preemption and time-limit notices (SIGTERM, and the
SIGUSR1/SIGUSR2 of `--signal=USR2@90`, which submitit uses), and Ctrl-C."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """While inside, the `STOP_SIGNALS` only record their number in the yielded list, for the loop to stop at
    the end of the step; a second Ctrl-C interrupts at once. The previous handlers return on leaving."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set in the main thread
        return

    def handle(signum, _frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def pass_on(signum: int) -> NoReturn:
    """Ends the process for a signal that stopped training, once its checkpoint is written: the handler that
    was there before training gets it (submitit's, which requeues the SLURM job), else the process exits with
    status 128 + signum, as the default action would report it."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)
    sys.exit(128 + signum)


def _world() -> tuple[int, int]:
    """(rank, world size) of this process in the torch.distributed group (0, 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_weights(
    x: torch.Tensor, x_hat: torch.Tensor, keys: Iterable[str], world: int
) -> dict[str, torch.Tensor]:
    """Per loss term, the factor that turns this rank's term into its share of the global batch's term, so
    that summing the ranks' gradients gives the gradient of one process on the whole batch.

    FVU terms divide by the variance of their batch: a rank's term times its own variance over the global
    one (AuxK's reconstructs the residual, so its variance); mean penalties over tokens weigh 1/world.
    """
    residual = (x - x_hat).detach()
    stats = [x.sum(0), x.pow(2).sum()[None], residual.sum(0), residual.pow(2).sum()[None]]
    n = torch.full((1,), float(len(x)), device=x.device)  # not new_tensor: a host-to-device copy waits
    local = torch.cat(stats + [n]).double()
    total = local.clone()
    dist.all_reduce(total)

    def centered(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        D, count = len(x[0]), s[-1]
        return s[D] - s[:D].pow(2).sum() / count, s[2 * D + 1] - s[D + 1 : 2 * D + 1].pow(2).sum() / count

    (x_local, r_local), (x_all, r_all) = centered(local), centered(total)
    w_x, w_r = (x_local / x_all.clamp_min(1e-12)).float(), (r_local / r_all.clamp_min(1e-12)).float()
    mean = torch.full((), 1 / world, device=x.device)
    return {k: w_r if k == "auxk" else mean if k.endswith("penalty") else w_x for k in keys}


def _reduce_step(params: list[torch.nn.Parameter], buffers: list[torch.Tensor], fired: torch.Tensor,
                 losses: dict[str, torch.Tensor], stopping: bool) -> tuple[torch.Tensor, dict, torch.Tensor]:  # fmt: skip
    """One all-reduce for a data-parallel step: sums the ranks' gradients (in place), firing counts [F] and
    weighted loss terms, averages the buffers (in place), and counts the ranks told to stop. Returns the
    global (fired, losses, stop votes)."""
    world = dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    vote = torch.full((1,), float(stopping), device=fired.device)  # not new_tensor: a host copy waits
    parts = (
        grads
        + [fired, torch.stack(list(losses.values())).detach(), vote]
        + [b.float() / world for b in buffers]
    )
    flat = torch.cat([t.flatten().float() for t in parts])
    dist.all_reduce(flat)
    pieces = flat.split([t.numel() for t in parts])
    for p, g in zip(params, pieces):
        p.grad = g.view_as(p).to(p.dtype)
    fired, summed, votes = pieces[len(params) : len(params) + 3]
    for b, value in zip(buffers, pieces[len(params) + 3 :]):
        b.copy_(value.view_as(b))
    return fired, dict(zip(losses, summed)), votes


def _agreed_signal(received: list[int], device: torch.device) -> int:
    """The stop signal of the data-parallel ranks (the largest number any rank received)."""
    signum = torch.tensor([received[0] if received else 0], device=device)
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return int(signum.item())


def train(
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    activations: Iterable[torch.Tensor],
    log: Logger = lambda metrics, step: None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    evaluate: Evaluate | None = None,
    resume: bool = False,
    extra_state: dict | None = None,
) -> SAE:
    """Trains an SAE on any iterable of float activation batches [B, D] and returns it (taking raw inputs).

    d_in comes from the first batch, d_sae = expansion_factor * d_in, the learning rate from d_sae unless
    set. Training stops after `cfg.tokens` tokens or when `activations` ends, whichever is first. Every
    `cfg.eval_every` steps, `evaluate(reconstruct)` receives a function mapping raw activations [B, D] to
    reconstructions and returns metrics to log (e.g. the spliced-in loss on held-out tokens).

    Checkpoints go to `checkpoint_dir` every `cfg.checkpoint_every` steps and at the end; `extra_state` is
    added to their state.json. With `resume`, training continues from the checkpoint there (if any) exactly
    as if it had never stopped: a resumable stream (`state()`/`restore()`, as `stream.Shuffled`, `Epochs`
    and `Prefetch` over them) is restored to its saved position, any other iterable is advanced past the
    batches already trained on. The `STOP_SIGNALS` (SIGTERM, SIGINT, SIGUSR1/2) end the current step, write a
    checkpoint and raise `Interrupted`.

    Data-parallel: inside a torch.distributed group of W processes, each passes its own batches of
    cfg.batch_size / W tokens; the loss terms are weighted so the summed gradients are those of one process
    on all W batches together, and all ranks take identical steps. Rank 0 writes the checkpoint files
    (each rank its own stream state); pass `log` and `evaluate` on rank 0 only. Every rank must be given
    at least as many batches as the run has steps (a rank whose batches end early leaves the others waiting).
    """
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()
    rank, world = _world()
    resumable = is_resumable(activations)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    found = find_checkpoint(checkpoint_dir) if resume and checkpoint_dir is not None else None
    saved_state = read_checkpoint_state(found, world) if found is not None else None
    if found is not None and saved_state["stream"] and resumable:  # type: ignore[index]
        activations.restore(load_stream_state(found, rank))  # type: ignore[attr-defined]
    batches = iter(activations)
    if saved_state is not None and not (saved_state["stream"] and resumable):
        # A stream without a saved position: replay it past the batches already trained on.
        for _ in range(saved_state["step"]):
            if next(batches, None) is None:
                break
    first = next(batches, None)
    if first is None and saved_state is None:
        raise ValueError("train() received no activation batches")
    d_in = first.shape[1] if first is not None else read_config(found)["d_in"]  # type: ignore[arg-type]
    sae = build(sae_cfg, d_in, cfg.seed).to(device)
    if first is not None:
        first = first.to(device).float()
    if saved_state is None:
        assert first is not None
        # The whole global batch sets the input scale and b_dec, as one process would see it.
        init = first
        if world > 1:
            parts = [torch.empty_like(first) for _ in range(world)]
            dist.all_gather(parts, first.contiguous())
            init = torch.cat(parts)
        scale = math.sqrt(d_in) / init.norm(dim=1).mean().item() if cfg.normalize_inputs else 1.0
        if sae_cfg.b_dec_init != "zeros":
            init = init * scale
            b_dec = geometric_median(init) if sae_cfg.b_dec_init == "geometric_median" else init.mean(dim=0)
            sae.b_dec.data.copy_(b_dec)
    else:
        scale = saved_state["input_scale"]
    if world > 1:
        for t in sae.state_dict().values():
            dist.broadcast(t, 0)

    lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae)
    groups = [{"params": [p for n, p in sae.named_parameters() if n != "threshold"], "lr": lr}]
    if sae.arch == "jumprelu":
        groups.append({"params": [sae.threshold], "lr": lr * sae_cfg.threshold_lr_scale})
    opt = torch.optim.Adam(groups, lr=lr, eps=6.25e-10, fused=True)  # one pass per parameter
    steps = max(1, cfg.tokens // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, cfg.warmup_steps, cfg.decay_fraction)
    )
    coef = sae_cfg.sparsity_coef if sae_cfg.sparsity_coef is not None else DEFAULT_SPARSITY.get(sae.arch, 0.0)
    warm = max(1, round(cfg.sparsity_warmup * steps))
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)  # tokens since each latent fired
    window = torch.zeros(sae.d_sae, device=device)  # firings since the last log
    eval_window = torch.zeros(sae.d_sae, device=device)  # firings since the last evaluation
    dead = (since_fired >= cfg.dead_tokens).nonzero().flatten()  # the dead latents, refreshed at log steps
    tokens = start = since_log = since_eval = 0
    if saved_state is not None:
        loop = load_checkpoint(found, sae, opt)  # type: ignore[arg-type]
        torch.set_rng_state(loop.pop("rng.cpu"))
        if device.type == "cuda" and "rng.cuda" in loop:
            torch.cuda.set_rng_state(loop.pop("rng.cuda"), device)
        loop = {k: v.to(device) for k, v in loop.items()}
        since_fired, window, eval_window, dead = (
            loop[k] for k in ("since_fired", "window", "eval_window", "dead")
        )
        start, tokens = saved_state["step"], saved_state["tokens"]
        since_log, since_eval = saved_state.get("since_log", 0), saved_state.get("since_eval", 0)
        sched.last_epoch = start - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": here on purpose
            warnings.simplefilter("ignore", UserWarning)
            sched.step()  # the learning rate of step `start`
    step_fn = torch.compile(sae.step) if cfg.compile else sae.step
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def stream():
        if first is not None:
            yield first * scale
        for x in batches:
            yield x.to(device).float() * scale

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x.to(device) * scale).x_hat / scale

    def checkpoint(step: int) -> None:
        """Writes the checkpoint after `step` steps (all ranks take part)."""
        assert checkpoint_dir is not None
        loop = {"since_fired": since_fired, "window": window, "eval_window": eval_window, "dead": dead,
                "rng.cpu": torch.get_rng_state()}  # fmt: skip
        if device.type == "cuda":
            loop["rng.cuda"] = torch.cuda.get_rng_state(device)
        state = {"step": step, "tokens": tokens, "input_scale": scale, "since_log": since_log,
                 "since_eval": since_eval} | (extra_state or {})  # fmt: skip
        stream_state = activations.state() if resumable else None  # type: ignore[attr-defined]
        save_checkpoint(sae, opt, state, checkpoint_dir, loop, stream_state, rank, world)

    bar = tqdm(zip(range(start, steps), stream()), initial=start, total=steps, desc=f"train {sae.arch}",
               unit="step", disable=rank != 0)  # fmt: skip
    done = start
    clock = time.perf_counter()
    sae.train()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # a loss was NaN/inf since the last check
    checked = start  # the last step known finite
    saved: int | None = start if saved_state is not None else None  # the step of the last checkpoint written
    params = list(sae.parameters())
    shared = list(sae.buffers())  # running statistics (BatchTopK's threshold): averaged over ranks

    def check(step: int) -> None:
        """Raises TrainingDiverged if a loss since the last check, or a weight now, is not finite."""
        nonlocal checked
        if bool(nonfinite) or not all(bool(torch.isfinite(p).all()) for p in params):
            where = (f"the last good checkpoint (step {saved}) is in {checkpoint_dir}" if saved is not None
                     else "no checkpoint was written before it")  # fmt: skip
            raise TrainingDiverged(
                f"training diverged: the loss or the weights became NaN or infinite between steps {checked} "
                f"and {step}; {where}. Lower train.lr, or look for NaN/inf in the activations "
                "(model.dtype=float32 rules out bf16 overflow).",
                checkpoint_dir if saved is not None else None,
            )
        checked = step

    stop_on_signals: contextlib.AbstractContextManager[list[int]] = (
        _stop_on_signals() if checkpoint_dir is not None else contextlib.nullcontext([])
    )
    with stop_on_signals as received:
        for step, x in bar:
            with autocast:
                out = step_fn(x, dead, coef * min(1.0, (step + 1) / warm), cfg.auxk_coef, sae_cfg.multi_topk)
            losses = out.losses
            if world > 1:
                weights = _rank_weights(x, out.x_hat, losses, world)
                losses = {k: v * weights[k] for k, v in losses.items()}
            loss = torch.stack(list(losses.values())).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            fired = out.fired
            if world > 1:
                fired, losses, votes = _reduce_step(params, shared, fired, losses, bool(received))
                loss = torch.stack(list(losses.values())).sum()
            nonfinite.logical_or_(~torch.isfinite(loss))
            if sae.unit_decoder:
                sae.remove_parallel_grad()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if sae.unit_decoder:
                sae.normalize_decoder()

            n = x.shape[0] * world
            window += fired
            eval_window += fired
            since_fired = torch.where(fired > 0, 0, since_fired + n)
            tokens += n
            since_log += n
            since_eval += n
            done = step + 1
            # Everything above runs without waiting for the device (but for data-parallel collectives); the host
            # reads values back only here.
            if step % cfg.log_every == 0 or step == steps - 1:
                check(step)
                now = time.perf_counter()
                metrics = {f"train/{k}": v.item() for k, v in losses.items()}
                metrics |= {
                    "train/loss": loss.item(),
                    "train/l0": out.l0.item(),
                    "train/mse": float((x - out.x_hat).pow(2).mean().item() / scale**2),
                    "train/dead_fraction": len(dead) / sae.d_sae,
                    "train/dense_fraction": (window > DENSE * since_log).float().mean().item(),
                    "train/lr": float(sched.get_last_lr()[0]),
                    "train/tokens": tokens,
                    "train/tokens_per_second": since_log / (now - clock),
                }
                log(metrics, step)
                bar.set_postfix(fvu=f"{metrics['train/fvu']:.3f}", l0=f"{metrics['train/l0']:.1f}",
                                dead=f"{metrics['train/dead_fraction']:.3f}")  # fmt: skip
                window.zero_()
                since_log, clock = 0, now
                dead = (since_fired >= cfg.dead_tokens).nonzero().flatten()
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                density = eval_window / since_eval
                metrics = {"train/log10_density": density.clamp_min(1e-10).log10().cpu()}
                if evaluate is not None:
                    sae.eval()
                    with torch.no_grad():
                        metrics |= {f"eval/{k}": v for k, v in evaluate(reconstruct).items()}
                    sae.train()
                log(metrics, step)
                eval_window.zero_()
                since_eval = 0
            if world == 1:
                stop = bool(received)
            else:  # the votes are read every 10 steps, the same steps on every rank: all stop after the same one
                stop = (step % 10 == 0 or step == steps - 1) and bool(votes.item())
                if stop:
                    received[:] = [_agreed_signal(received, device)]
            periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if checkpoint_dir is not None and (periodic or stop):
                check(step)  # a checkpoint is only ever written from finite weights
                checkpoint(step + 1)
                saved = step + 1
            if stop:
                bar.close()
                assert checkpoint_dir is not None
                raise Interrupted(received[0], step + 1, checkpoint_dir)
    bar.close()
    check(done - 1)
    if checkpoint_dir is not None and saved != done:
        checkpoint(done)
    sae.eval()
    sae.fold_input_scale(scale)
    return sae
