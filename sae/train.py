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

import ctypes
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae.config import SAEConfig, TrainConfig
from sae.files import save_tensors, write_json
from sae.harvest import resolve_dtype
from sae.model import SAE

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


def save_checkpoint(sae: SAE, opt: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """SAE weights (in the scaled input space), Adam moments and loop counters in `path`, each file atomic."""
    sae.save(path)
    moments = {}
    for name, p in sae.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                moments[f"{name}.{key}"] = value.float()
    save_tensors(path / "optimizer.safetensors", moments)
    write_json(path / "state.json", state)


def build(sae_cfg: SAEConfig, d_in: int, seed: int = 0) -> SAE:
    """The untrained SAE a config describes, for activations of width d_in."""
    d_sae = sae_cfg.expansion_factor * d_in
    prefixes = tuple(sorted({max(1, round(f * d_sae)) for f in sae_cfg.prefixes}))
    return SAE(d_in, d_sae, sae_cfg.k, arch=sae_cfg.arch, prefixes=prefixes, bandwidth=sae_cfg.bandwidth,
               threshold_init=sae_cfg.threshold_init, seed=seed)  # fmt: skip


def train(
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    activations: Iterable[torch.Tensor],
    log: Logger = lambda metrics, step: None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    evaluate: Evaluate | None = None,
) -> SAE:
    """Trains an SAE on any iterable of float activation batches [B, D] and returns it (taking raw inputs).

    d_in comes from the first batch, d_sae = expansion_factor * d_in, the learning rate from d_sae unless
    set. Training stops after `cfg.tokens` tokens or when `activations` ends, whichever is first. Every
    `cfg.eval_every` steps, `evaluate(reconstruct)` receives a function mapping raw activations [B, D] to
    reconstructions and returns metrics to log (e.g. the spliced-in loss on held-out tokens).
    """
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()
    batches = iter(activations)
    first = next(batches, None)
    if first is None:
        raise ValueError("train() received no activation batches")
    d_in = first.shape[1]
    sae = build(sae_cfg, d_in, cfg.seed).to(device)
    first = first.to(device).float()
    scale = math.sqrt(d_in) / first.norm(dim=1).mean().item() if cfg.normalize_inputs else 1.0
    first = first * scale
    if sae_cfg.b_dec_init != "zeros":
        init = geometric_median(first) if sae_cfg.b_dec_init == "geometric_median" else first.mean(dim=0)
        sae.b_dec.data.copy_(init)

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
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    step_fn = torch.compile(sae.step) if cfg.compile else sae.step
    bf16 = resolve_precision(cfg.precision, device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def stream():
        yield first
        for x in batches:
            yield x.to(device).float() * scale

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x.to(device) * scale).x_hat / scale

    bar = tqdm(zip(range(steps), stream()), total=steps, desc=f"train {sae.arch}", unit="step")
    tokens = done = since_log = since_eval = 0
    clock = time.perf_counter()
    sae.train()
    dead = (since_fired >= cfg.dead_tokens).nonzero().flatten()  # the dead latents, refreshed at log steps
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # a loss was NaN/inf since the last check
    checked = 0  # the last step known finite
    saved: int | None = None  # the step of the last checkpoint written

    def check(step: int) -> None:
        """Raises TrainingDiverged if a loss since the last check, or a weight now, is not finite."""
        nonlocal checked
        if bool(nonfinite) or not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
            where = (f"the last good checkpoint (step {saved}) is in {checkpoint_dir}" if saved is not None
                     else "no checkpoint was written before it")  # fmt: skip
            raise TrainingDiverged(
                f"training diverged: the loss or the weights became NaN or infinite between steps {checked} "
                f"and {step}; {where}. Lower train.lr, or look for NaN/inf in the activations "
                "(model.dtype=float32 rules out bf16 overflow).",
                checkpoint_dir if saved is not None else None,
            )
        checked = step

    for step, x in bar:
        with autocast:
            out = step_fn(x, dead, coef * min(1.0, (step + 1) / warm), cfg.auxk_coef, sae_cfg.multi_topk)
        loss = torch.stack(list(out.losses.values())).sum()
        opt.zero_grad(set_to_none=True)
        nonfinite.logical_or_(~torch.isfinite(loss))
        loss.backward()
        if sae.unit_decoder:
            sae.remove_parallel_grad()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if sae.unit_decoder:
            sae.normalize_decoder()

        window += out.fired
        eval_window += out.fired
        since_fired = torch.where(out.fired > 0, 0, since_fired + x.shape[0])
        tokens += x.shape[0]
        since_log += x.shape[0]
        since_eval += x.shape[0]
        done = step + 1
        # Everything above runs without waiting for the device; the host reads values back only here.
        if step % cfg.log_every == 0 or step == steps - 1:
            check(step)
            now = time.perf_counter()
            metrics = {f"train/{k}": v.item() for k, v in out.losses.items()}
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
        if checkpoint_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            check(step)  # a checkpoint is only ever written from finite weights
            save_checkpoint(
                sae, opt, {"step": step + 1, "tokens": tokens, "input_scale": scale}, checkpoint_dir
            )
            saved = step + 1
    bar.close()
    check(done - 1)
    if checkpoint_dir is not None:
        save_checkpoint(sae, opt, {"step": done, "tokens": tokens, "input_scale": scale}, checkpoint_dir)
    sae.eval()
    sae.fold_input_scale(scale)
    return sae
