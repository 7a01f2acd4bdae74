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
from dataclasses import dataclass
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
from sae.model import SAE, Step, read_config
from sae.stream import is_resumable

# Sparsity coefficients in FVU units for SmolLM2-135M block 15 (4608 latents). At 400k tokens: jumprelu 1.5e-3
# -> L0 84, 5e-3 -> L0 35; relu 6e-4 -> L0 1295, 0.015 -> L0 33. Codes keep getting sparser with longer
# training: at the demo's 2.5M tokens jumprelu 5e-3 -> L0 14, 2e-3 -> L0 39, and relu 0.015 -> L0 10.
DEFAULT_SPARSITY = {"jumprelu": 2e-3, "relu": 0.015}
DENSE = 0.1  # a latent firing on more than this fraction of tokens counts as dense
DIVERGED_FVU = 10.0
"""An FVU this many times worse than predicting the mean (1.0) is divergence, finite or not: training stops
when its logged FVU exceeds this multiple of its first (at least 1), and a held-out FVU above it is not a
finished run. Healthy runs stay well below 1."""

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


def learning_rate(cfg: TrainConfig, d_sae: int) -> float:
    """The learning rate a run of `d_sae` latents trains at: `train.lr`, else `default_lr(d_sae)`."""
    return cfg.lr if cfg.lr is not None else default_lr(d_sae)


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
    d_sae = sae_cfg.width(d_in)
    prefixes = tuple(sorted({max(1, round(f * d_sae)) for f in sae_cfg.prefixes}))
    return SAE(
        d_in,
        d_sae,
        sae_cfg.k,
        arch=sae_cfg.arch,
        prefixes=prefixes,
        bandwidth=sae_cfg.bandwidth,
        threshold_init=sae_cfg.threshold_init,
        seed=seed,
    )


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
def _stop_on_signals(enabled: bool = True) -> Iterator[list[int]]:
    """While inside, the `STOP_SIGNALS` only record their number in the yielded list, for the loop to stop at
    the end of the step; a second Ctrl-C interrupts at once. The previous handlers return on leaving. Not
    `enabled` (or outside the main thread, where signal handlers cannot be set): the list stays empty."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
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


def _reduce_step(
    params: list[torch.nn.Parameter],
    buffers: list[torch.Tensor],
    fired: torch.Tensor,
    losses: dict[str, torch.Tensor],
    stopping: bool,
) -> tuple[torch.Tensor, dict, torch.Tensor]:
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


@dataclass
class _Counters:
    """The loop's running counts, saved in checkpoints: per-latent firing statistics on the device and token
    counts on the host."""

    since_fired: torch.Tensor  # [F] tokens since each latent fired
    window: torch.Tensor  # [F] firings since the last log
    eval_window: torch.Tensor  # [F] firings since the last evaluation
    dead: torch.Tensor  # [n_dead] the dead latents AuxK uses, refreshed at log steps
    tokens: int = 0
    since_log: int = 0  # tokens since the last log
    since_eval: int = 0  # tokens since the last evaluation

    @classmethod
    def fresh(cls, d_sae: int, dead_tokens: int, device: torch.device) -> "_Counters":
        """The counts of a run that has not started."""
        since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        window, eval_window = torch.zeros(d_sae, device=device), torch.zeros(d_sae, device=device)
        return cls(since_fired, window, eval_window, (since_fired >= dead_tokens).nonzero().flatten())

    @classmethod
    def restored(cls, loop: dict[str, torch.Tensor], state: dict, device: torch.device) -> "_Counters":
        """The counts a checkpoint saved: its loop tensors and state.json."""
        since_fired, window, eval_window, dead = (
            loop[k].to(device) for k in ("since_fired", "window", "eval_window", "dead")
        )
        since_log, since_eval = state.get("since_log", 0), state.get("since_eval", 0)
        return cls(since_fired, window, eval_window, dead, state["tokens"], since_log, since_eval)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-latent counts by their checkpoint names."""
        return {
            "since_fired": self.since_fired,
            "window": self.window,
            "eval_window": self.eval_window,
            "dead": self.dead,
        }

    def add(self, fired: torch.Tensor, n: int) -> None:
        """Counts a step of n tokens (all ranks') in which latent i fired on fired[i] of them [F]."""
        self.window += fired
        self.eval_window += fired
        self.since_fired = torch.where(fired > 0, 0, self.since_fired + n)
        self.tokens += n
        self.since_log += n
        self.since_eval += n

    def logged(self, dead_tokens: int) -> None:
        """Starts the next log window and refreshes the dead latents (a host read: at log steps only)."""
        self.window.zero_()
        self.since_log = 0
        self.dead = (self.since_fired >= dead_tokens).nonzero().flatten()

    def evaluated(self) -> None:
        """Starts the next evaluation window."""
        self.eval_window.zero_()
        self.since_eval = 0


class _Divergence:
    """Watches the loss and the weights for NaN and inf. The losses of every step are or-ed into a flag on the
    device, and the host reads it (and the weights) only at `check`, so the steps in between never wait."""

    def __init__(
        self, params: list[torch.nn.Parameter], start: int, checkpoint_dir: Path | None, device: torch.device
    ):
        self.params, self.checkpoint_dir = params, checkpoint_dir
        # Whether a loss was NaN or infinite since the last check.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.checked = start  # the last step known finite
        self.first_fvu: float | None = None  # the training FVU of the first log step

    def record(self, loss: torch.Tensor) -> None:
        """Notes whether a step's loss (a scalar) is finite, without reading it back."""
        self.nonfinite.logical_or_(~torch.isfinite(loss))

    def check(self, step: int, saved: int | None) -> None:
        """Raises TrainingDiverged if a loss since the last check, or a weight now, is not finite; `saved` is
        the step of the last checkpoint written (None: none was)."""
        if bool(self.nonfinite) or not all(bool(torch.isfinite(p).all()) for p in self.params):
            where = (
                f"the last good checkpoint (step {saved}) is in {self.checkpoint_dir}"
                if saved is not None
                else "no checkpoint was written before it"
            )
            raise TrainingDiverged(
                f"training diverged: the loss or the weights became NaN or infinite between steps "
                f"{self.checked} and {step}; {where}. Lower train.lr, or look for NaN/inf in the activations "
                "(model.dtype=float32 rules out bf16 overflow).",
                self.checkpoint_dir if saved is not None else None,
            )
        self.checked = step

    def check_fvu(self, step: int, fvu: float, cfg: TrainConfig, d_sae: int) -> None:
        """Raises TrainingDiverged if the training FVU logged at `step` rose `DIVERGED_FVU` times above the
        first one logged (at least 1): weights that stayed finite but stopped reconstructing anything."""
        if self.first_fvu is None:
            self.first_fvu = fvu
        limit = DIVERGED_FVU * max(1.0, self.first_fvu)
        if fvu > limit:
            raise TrainingDiverged(
                diverged_message(f"the training FVU rose to {fvu:.3g} at step {step}", cfg, d_sae), None
            )


def diverged_message(what: str, cfg: TrainConfig, d_sae: int) -> str:
    """The error of a run of `d_sae` latents diverged to finite nonsense (`what` happened): it names train.lr."""
    lr = learning_rate(cfg, d_sae)
    setting = f"train.lr={cfg.lr}" if cfg.lr is not None else f"train.lr=null (the width's default, {lr:.3g})"
    return (
        f"training diverged: {what}, more than {DIVERGED_FVU:g} times worse than predicting the mean; lower "
        f"{setting}"
    )


def _resumed(checkpoint_dir: Path | None, resume: bool, world: int) -> tuple[Path | None, dict | None]:
    """The checkpoint a run resumes from and its state.json, or (None, None) for a new run."""
    found = find_checkpoint(checkpoint_dir) if resume and checkpoint_dir is not None else None
    return found, read_checkpoint_state(found, world) if found is not None else None


def _batches(
    activations: Iterable[torch.Tensor],
    found: Path | None,
    state: dict | None,
    rank: int,
    device: torch.device,
) -> tuple[Iterator[torch.Tensor], torch.Tensor | None, int]:
    """The batches left to train on: (their iterator past the first, the first [B, D] as float32 on `device`
    or None where a resumed stream has ended, d_in). A resumed run (checkpoint `found`, its state.json
    `state`) continues where it stopped."""
    resumable = is_resumable(activations)
    if state is not None and state["stream"] and resumable:
        activations.restore(load_stream_state(found, rank))  # type: ignore[arg-type, attr-defined]
    batches = iter(activations)
    if state is not None and not (state["stream"] and resumable):
        # A stream without a saved position: replay it past the batches already trained on.
        for _ in range(state["step"]):
            if next(batches, None) is None:
                break
    first = next(batches, None)
    if first is None:
        if state is None:
            raise ValueError("train() received no activation batches")
        return batches, None, read_config(found)["d_in"]  # type: ignore[arg-type]
    return batches, first.to(device).float(), first.shape[1]


def _scaled(
    first: torch.Tensor | None, batches: Iterator[torch.Tensor], scale: float, device: torch.device
) -> Iterator[torch.Tensor]:
    """The training batches [B, D]: float32 on `device`, times the input scale."""
    if first is not None:
        yield first * scale
    for x in batches:
        yield x.to(device).float() * scale


def _init_sae(
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    d_in: int,
    first: torch.Tensor | None,
    state: dict | None,
    device: torch.device,
    world: int,
) -> tuple[SAE, float]:
    """The SAE to train, on `device`, and its input scale. A new run takes the scale and b_dec from the first
    global batch (`first` [B, D] on each rank); a resumed one (checkpoint state.json `state`) its saved
    scale, its weights being loaded later. Every data-parallel rank starts from rank 0's weights."""
    sae = build(sae_cfg, d_in, cfg.seed).to(device)
    if state is not None:
        scale = state["input_scale"]
    else:
        assert first is not None
        # The whole global batch sets the input scale and b_dec, as one process would see it.
        init = first  # [B, D]
        if world > 1:
            parts = [torch.empty_like(first) for _ in range(world)]
            dist.all_gather(parts, first.contiguous())
            init = torch.cat(parts)  # [W * B, D]
        scale = math.sqrt(d_in) / init.norm(dim=1).mean().item() if cfg.normalize_inputs else 1.0
        if sae_cfg.b_dec_init != "zeros":
            init = init * scale
            b_dec = geometric_median(init) if sae_cfg.b_dec_init == "geometric_median" else init.mean(dim=0)
            sae.b_dec.data.copy_(b_dec)
    if world > 1:
        for t in sae.state_dict().values():
            dist.broadcast(t, 0)
    return sae, scale


def _optimizer(
    sae: SAE, sae_cfg: SAEConfig, cfg: TrainConfig, steps: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam (the JumpReLU threshold at its own rate) and its learning-rate schedule over `steps`."""
    lr = learning_rate(cfg, sae.d_sae)
    groups = [{"params": [p for n, p in sae.named_parameters() if n != "threshold"], "lr": lr}]
    if sae.arch == "jumprelu":
        groups.append({"params": [sae.threshold], "lr": lr * sae_cfg.threshold_lr_scale})
    opt = torch.optim.Adam(groups, lr=lr, eps=6.25e-10, fused=True)  # one pass per parameter
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, cfg.warmup_steps, cfg.decay_fraction)
    )
    return opt, sched


def _sparsity(sae_cfg: SAEConfig, cfg: TrainConfig, arch: str, steps: int) -> Callable[[int], float]:
    """The sparsity coefficient of each step: the configured or the architecture's default one, warmed up
    linearly over the first `sparsity_warmup` of the steps."""
    coef = sae_cfg.sparsity_coef if sae_cfg.sparsity_coef is not None else DEFAULT_SPARSITY.get(arch, 0.0)
    warm = max(1, round(cfg.sparsity_warmup * steps))
    return lambda step: coef * min(1.0, (step + 1) / warm)


def _loop_state(
    found: Path | None,
    state: dict | None,
    sae: SAE,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    dead_tokens: int,
    device: torch.device,
) -> tuple[_Counters, int]:
    """The counts and the first step of the loop: a new run's, or those of checkpoint `found` (state.json
    `state`), which is loaded into `sae` and `opt` with the RNG states and the learning rate it saved."""
    if found is None:
        return _Counters.fresh(sae.d_sae, dead_tokens, device), 0
    assert state is not None
    loop = load_checkpoint(found, sae, opt)
    torch.set_rng_state(loop.pop("rng.cpu"))
    if device.type == "cuda" and "rng.cuda" in loop:
        torch.cuda.set_rng_state(loop.pop("rng.cuda"), device)
    start = state["step"]
    sched.last_epoch = start - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": here on purpose
        warnings.simplefilter("ignore", UserWarning)
        sched.step()  # the learning rate of step `start`
    return _Counters.restored(loop, state, device), start


def _checkpointer(
    path: Path | None,
    sae: SAE,
    opt: torch.optim.Optimizer,
    counters: _Counters,
    scale: float,
    activations: Iterable[torch.Tensor],
    extra_state: dict | None,
    device: torch.device,
    rank: int,
    world: int,
) -> Callable[[int], None]:
    """The function writing the checkpoint after a given step to `path`, as the run stands then."""
    resumable = is_resumable(activations)

    def checkpoint(step: int) -> None:
        """Writes the checkpoint after `step` steps (all ranks take part)."""
        assert path is not None
        loop = counters.tensors() | {"rng.cpu": torch.get_rng_state()}
        if device.type == "cuda":
            loop["rng.cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "step": step,
            "tokens": counters.tokens,
            "input_scale": scale,
            "since_log": counters.since_log,
            "since_eval": counters.since_eval,
        } | (extra_state or {})
        stream_state = activations.state() if resumable else None  # type: ignore[attr-defined]
        save_checkpoint(sae, opt, state, path, loop, stream_state, rank, world)

    return checkpoint


def _forward(sae: SAE, cfg: TrainConfig, device: torch.device) -> Callable[..., Step]:
    """`sae.step`, compiled under `cfg.compile`, its large matmuls in bf16 where `cfg.precision` resolves to it."""
    step_fn = torch.compile(sae.step) if cfg.compile else sae.step
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def forward(
        x: torch.Tensor, dead: torch.Tensor, sparsity_coef: float, auxk_coef: float, multi_topk: bool
    ) -> Step:
        """The training forward pass of x [B, D] (`SAE.step`)."""
        with autocast:
            return step_fn(x, dead, sparsity_coef, auxk_coef, multi_topk)

    return forward


def _backward(
    out: Step,
    x: torch.Tensor,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    shared: list[torch.Tensor],
    world: int,
    stopping: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sets the gradients of the loss of forward pass `out` on x [B, D], those of the global batch where
    data-parallel (see `_rank_weights`, `_reduce_step`). Returns the global batch's (loss terms, loss,
    firings [F]) and the number of ranks told to stop (None in one process)."""
    losses = out.losses
    if world > 1:
        weights = _rank_weights(x, out.x_hat, losses, world)
        losses = {k: v * weights[k] for k, v in losses.items()}
    loss = torch.stack(list(losses.values())).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if world == 1:
        return losses, loss, out.fired, None
    fired, losses, votes = _reduce_step(params, shared, out.fired, losses, stopping)
    return losses, torch.stack(list(losses.values())).sum(), fired, votes


def _update(
    sae: SAE,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    grad_clip: float,
) -> None:
    """One optimizer step from the gradients: without their part along the unit-norm decoder rows, clipped,
    then the decoder rows back at unit norm."""
    if sae.unit_decoder:
        sae.remove_parallel_grad()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    if sae.unit_decoder:
        sae.normalize_decoder()


def _train_metrics(
    x: torch.Tensor,
    out: Step,
    losses: dict[str, torch.Tensor],
    loss: torch.Tensor,
    scale: float,
    counters: _Counters,
    sched: torch.optim.lr_scheduler.LRScheduler,
    seconds: float,
) -> dict[str, float]:
    """The metrics of a log step on batch x [B, D] (scaled): its loss terms, L0 and MSE in raw units, and over
    the window since the last log (`seconds` long) the dead and dense fractions of latents and the
    throughput."""
    metrics = {f"train/{k}": v.item() for k, v in losses.items()}
    return metrics | {
        "train/loss": loss.item(),
        "train/l0": out.l0.item(),
        "train/mse": float((x - out.x_hat).pow(2).mean().item() / scale**2),
        "train/dead_fraction": len(counters.dead) / len(counters.since_fired),
        "train/dense_fraction": (counters.window > DENSE * counters.since_log).float().mean().item(),
        "train/lr": float(sched.get_last_lr()[0]),
        "train/tokens": counters.tokens,
        "train/tokens_per_second": counters.since_log / seconds,
    }


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's summary of a log step's metrics."""
    return {
        "fvu": f"{metrics['train/fvu']:.3f}",
        "l0": f"{metrics['train/l0']:.1f}",
        "dead": f"{metrics['train/dead_fraction']:.3f}",
    }


def _eval_metrics(
    sae: SAE, scale: float, device: torch.device, counters: _Counters, evaluate: Evaluate | None
) -> dict:
    """The metrics of an evaluation step: the latents' firing densities since the last one, and those
    `evaluate` returns for the SAE in raw units."""
    density = counters.eval_window / counters.since_eval  # [F]
    metrics = {"train/log10_density": density.clamp_min(1e-10).log10().cpu()}
    if evaluate is not None:

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            """Raw activations [B, D] -> their reconstructions [B, D]."""
            return sae(x.to(device) * scale).x_hat / scale

        sae.eval()
        with torch.no_grad():
            metrics |= {f"eval/{k}": v for k, v in evaluate(reconstruct).items()}
        sae.train()
    return metrics


def _stopping(
    received: list[int], votes: torch.Tensor | None, step: int, steps: int, device: torch.device
) -> bool:
    """Whether training stops after `step` for a stop signal. Data-parallel (`votes`: the number of ranks that
    received one), the votes are read every 10 steps, the same steps on every rank, so all stop after the
    same one, and `received` then holds the signal they agree on."""
    if votes is None:
        return bool(received)
    stop = (step % 10 == 0 or step == steps - 1) and bool(votes.item())
    if stop:
        received[:] = [_agreed_signal(received, device)]
    return stop


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

    d_in comes from the first batch, d_sae = expansion_factor * d_in (or `sae_cfg.d_sae`), the learning rate from d_sae unless
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
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    found, state = _resumed(checkpoint_dir, resume, world)
    batches, first, d_in = _batches(activations, found, state, rank, device)
    sae, scale = _init_sae(sae_cfg, cfg, d_in, first, state, device, world)
    steps = max(1, cfg.tokens // cfg.batch_size)
    opt, sched = _optimizer(sae, sae_cfg, cfg, steps)
    sparsity = _sparsity(sae_cfg, cfg, sae.arch, steps)
    counters, start = _loop_state(found, state, sae, opt, sched, cfg.dead_tokens, device)
    forward = _forward(sae, cfg, device)
    checkpoint = _checkpointer(
        checkpoint_dir, sae, opt, counters, scale, activations, extra_state, device, rank, world
    )
    params = list(sae.parameters())
    shared = list(sae.buffers())  # running statistics (BatchTopK's threshold): averaged over ranks
    divergence = _Divergence(params, start, checkpoint_dir, device)
    saved = start if found is not None else None  # the step of the last checkpoint written
    done, clock = start, time.perf_counter()
    todo = zip(range(start, steps), _scaled(first, batches, scale, device))
    bar = tqdm(todo, initial=start, total=steps, desc=f"train {sae.arch}", unit="step", disable=rank != 0)
    sae.train()
    with _stop_on_signals(checkpoint_dir is not None) as received:
        for step, x in bar:
            out = forward(x, counters.dead, sparsity(step), cfg.auxk_coef, sae_cfg.multi_topk)
            losses, loss, fired, votes = _backward(out, x, opt, params, shared, world, bool(received))
            divergence.record(loss)
            _update(sae, opt, sched, params, cfg.grad_clip)
            counters.add(fired, x.shape[0] * world)
            done = step + 1
            # Everything above runs without waiting for the device (but for data-parallel collectives); the host
            # reads values back only here.
            if step % cfg.log_every == 0 or step == steps - 1:
                divergence.check(step, saved)
                now = time.perf_counter()
                metrics = _train_metrics(x, out, losses, loss, scale, counters, sched, now - clock)
                log(metrics, step)
                divergence.check_fvu(step, metrics["train/fvu"], cfg, sae.d_sae)
                bar.set_postfix(_postfix(metrics))
                counters.logged(cfg.dead_tokens)
                clock = now
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                log(_eval_metrics(sae, scale, device, counters, evaluate), step)
                counters.evaluated()
            stop = _stopping(received, votes, step, steps, device)
            periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if checkpoint_dir is not None and (periodic or stop):
                divergence.check(step, saved)  # a checkpoint is only ever written from finite weights
                checkpoint(step + 1)
                saved = step + 1
            if stop:
                bar.close()
                assert checkpoint_dir is not None
                raise Interrupted(received[0], step + 1, checkpoint_dir)
    bar.close()
    divergence.check(done - 1, saved)
    if checkpoint_dir is not None and saved != done:
        checkpoint(done)
    sae.eval()
    sae.fold_input_scale(scale)
    return sae
