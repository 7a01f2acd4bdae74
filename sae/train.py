"""`train(cfg, activations) -> SAE`: the training loop.

The recipe follows Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"): loss is the normalized
MSE (FVU of the batch) plus AuxK; Adam with eps 6.25e-10; learning rate scaled as 1/sqrt(d_sae); decoder rows
kept at unit norm with the parallel gradient component removed; b_dec initialised at the geometric median of
the first batch. The learning rate (see `default_lr`) warms up linearly and decays linearly to zero over the last
`decay_fraction` of steps (Conerly et al. 2024, "April update").
"""

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae.config import SAEConfig, TrainConfig
from sae.files import save_tensors, write_json
from sae.metrics import fvu, l0
from sae.model import SAE

Logger = Callable[[dict, int], None]


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


def auxk_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, pre_acts: torch.Tensor, dead: torch.Tensor):
    """AuxK (Gao et al. 2024, appendix A.2): the top-k_aux dead latents, k_aux = D/2, reconstruct the main
    residual; normalized by the residual's variance so it is scale-free like the main loss."""
    k_aux = min(sae.d_in // 2, int(dead.sum()))
    residual = (x - x_hat).detach()  # [B, D]
    dead_pre = pre_acts.masked_fill(~dead, float("-inf"))  # [B, F]
    acts, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)  # [B, k_aux]
    acts = acts.clamp_min(0)
    e_hat = torch.nn.functional.embedding_bag(idx, sae.W_dec, per_sample_weights=acts, mode="sum")  # [B, D]
    return fvu(residual, e_hat)


def save_checkpoint(sae: SAE, opt: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """SAE weights, Adam moments and loop counters in `path`, each file written atomically."""
    sae.save(path)
    moments = {}
    for name, p in sae.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                moments[f"{name}.{key}"] = value.float()
    save_tensors(path / "optimizer.safetensors", moments)
    write_json(path / "state.json", state)


def train(
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    activations: Iterable[torch.Tensor],
    log: Logger = lambda metrics, step: None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """Trains an SAE on any iterable of float activation batches [B, D] and returns it.

    d_in comes from the first batch, d_sae = expansion_factor * d_in, the learning rate from d_sae unless
    set. Training stops after `cfg.tokens` tokens or when `activations` ends, whichever is first.
    """
    batches = iter(activations)
    first = next(batches, None)
    if first is None:
        raise ValueError("train() received no activation batches")
    d_in = first.shape[1]
    sae = SAE(d_in, sae_cfg.expansion_factor * d_in, sae_cfg.k, seed=cfg.seed).to(device)
    first = first.to(device).float()
    if sae_cfg.b_dec_init != "zeros":
        init = geometric_median(first) if sae_cfg.b_dec_init == "geometric_median" else first.mean(dim=0)
        sae.b_dec.data.copy_(init)

    lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
    steps = max(1, cfg.tokens // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps, cfg.warmup_steps, cfg.decay_fraction)
    )
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)  # tokens since each latent fired
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def stream():
        yield first
        for x in batches:
            yield x.to(device).float()

    bar = tqdm(zip(range(steps), stream()), total=steps, desc="train", unit="step")
    tokens = done = 0
    for step, x in bar:
        out = sae(x)
        loss_main = fvu(x, out.x_hat)
        dead = since_fired >= cfg.dead_tokens
        loss_aux = auxk_loss(sae, x, out.x_hat, out.pre_acts, dead) if dead.any() else x.new_zeros(())
        loss = loss_main + cfg.auxk_coef * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sched.step()
        sae.normalize_decoder()

        fired = torch.zeros_like(since_fired).index_fill_(0, out.idx[out.acts > 0], 1).bool()
        since_fired = torch.where(fired, 0, since_fired + x.shape[0])
        tokens += x.shape[0]
        done = step + 1
        if step % cfg.log_every == 0 or step == steps - 1:
            metrics = {
                "train/loss": loss.item(), "train/fvu": loss_main.item(), "train/auxk": loss_aux.item(),
                "train/l0": l0(out.acts).item(), "train/dead_fraction": dead.float().mean().item(),
                "train/lr": sched.get_last_lr()[0], "train/tokens": tokens,
            }  # fmt: skip
            log(metrics, step)
            bar.set_postfix(fvu=f"{metrics['train/fvu']:.3f}", dead=f"{metrics['train/dead_fraction']:.3f}")
        if checkpoint_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(sae, opt, {"step": step + 1, "tokens": tokens}, checkpoint_dir)
    bar.close()
    if checkpoint_dir is not None:
        save_checkpoint(sae, opt, {"step": done, "tokens": tokens}, checkpoint_dir)
    return sae
