"""Peer TopK SAEs, each trained by its own library's default recipe, on activations we hand them.

    python bench/peers.py          # smoke check: each installed peer on Gaussian and on sparse synthetic data

`bench/quality.py` calls `train_saelens` and `train_sparsify` on the same in-memory activations, width, k,
batch size and token budget as our own SAE. Everything the caller does not fix (optimizer, learning rate
and schedule, AuxK and dead-latent window, decoder initialisation and normalisation, b_dec initialisation)
is left at the peer's default, read from its installed source and cited below.

Needs the peers (import names `sae_lens`, `sparsify`), e.g. `pip install sae-lens eai-sparsify` into an
environment that has the CPU build of torch; checked with sae-lens 6.54.12 and eai-sparsify 1.3.3.

Token budget: both peers take `max(1, tokens // batch_size)` full batches, as `sae.train.train` does, drawn
in the same order as `sae.stream.epochs` for the same seed (one permutation of x per pass).
"""

import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import NamedTuple

import torch


class Trained(NamedTuple):
    """A peer SAE after training, behind one call that the benchmark evaluates."""

    name: str
    """"sae-lens" or "sparsify"."""
    reconstruct: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    """x [B, D] -> (x_hat [B, D], dense latent activations [B, F]), without gradients."""
    train_seconds: float
    """Wall time of the training loop only (no imports, no evaluation)."""
    info: dict
    """Versions, learning rate, steps, tokens seen, the recipe's notable settings."""


PACKAGES = {"sae-lens": "sae-lens", "sparsify": "eai-sparsify"}  # peer name -> PyPI distribution


def available() -> dict[str, str | None]:
    """{"sae-lens": version or None, "sparsify": version or None}: which peers are installed."""
    found: dict[str, str | None] = {}
    for name, dist in PACKAGES.items():
        try:
            found[name] = version(dist)
        except PackageNotFoundError:
            found[name] = None
    return found


def installed_trainers(names: str) -> dict[str, Callable[..., Trained]]:
    """{"<peer> <version>": its train function} for the comma-separated peer names that are installed
    ("none": no peer); says which are skipped."""
    wanted = [] if names == "none" else names.split(",")
    found = available()
    trainers = {}
    for name in wanted:
        if found.get(name) is None:
            print(f"{name}: not installed (pip install -e .[bench]); skipped")
            continue
        trainers[f"{name} {found[name]}"] = {"sae-lens": train_saelens, "sparsify": train_sparsify}[name]
    return trainers


def _steps(x: torch.Tensor, tokens: int, batch_size: int) -> int:
    """Optimizer steps for a budget of `tokens`, as `sae.train.train` counts them (full batches only)."""
    if x.ndim != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be a float32 [N, D] tensor, got {x.dtype} {list(x.shape)}")
    if len(x) < batch_size:
        raise ValueError(f"x holds {len(x)} tokens, fewer than one batch of {batch_size}")
    return max(1, tokens // batch_size)


def _batches(x: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` shuffled batches [batch_size, D] of x [N, D], pass after pass, in `sae.stream.epochs` order."""
    g = torch.Generator().manual_seed(seed)
    served = 0
    while True:
        perm = torch.randperm(len(x), generator=g)  # [N]
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[perm[i : i + batch_size]]  # [B, D]
            served += 1
            if served == steps:
                return


def train_saelens(
    x: torch.Tensor, d_sae: int, k: int, tokens: int, batch_size: int, seed: int = 0
) -> Trained:
    """Trains SAELens' `TopKTrainingSAE` with its `SAETrainer` on x [N, D], SAELens defaults throughout.

    The trainer config comes from `LanguageModelSAERunnerConfig.to_sae_trainer_config()`, the path SAELens'
    own runner takes, so every training default is the runner's: Adam lr 3e-4, betas (0.9, 0.999), constant
    schedule, no warm-up, gradient-norm clipping at 1.0, a latent is dead after 1000 steps without firing
    (sae_lens/config.py `LanguageModelSAERunnerConfig`, sae_lens/training/sae_trainer.py `_train_step`).
    The SAE keeps `TopKTrainingSAEConfig`'s defaults (sae_lens/saes/topk_sae.py, saes/sae.py): AuxK with
    coefficient 1.0 and k_aux = D/2, loss = squared error summed over D and averaged over the batch (not
    normalised), decoder rows initialised at norm 0.1 with W_enc = W_dec^T (`decoder_init_norm`,
    Anthropic's April 2024 update), b_dec at zero and subtracted from the input, decoder norms not
    constrained but divided out of the activations (`rescale_acts_by_decoder_norm=True`), no input
    normalisation (`normalize_activations="none"`). Only the caller's width, k, batch and budget are set.
    """
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LoggingConfig,
        SAETrainer,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    steps = _steps(x, tokens, batch_size)
    torch.manual_seed(seed)
    sae_cfg = TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu")
    sae = TopKTrainingSAE(sae_cfg)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        training_tokens=steps * batch_size,  # SAETrainer steps while samples seen < this: exactly `steps`
        train_batch_size_tokens=batch_size,
        device="cpu",
        dtype="float32",
        seed=seed,
        # No W&B, checkpoints or output files; none of these change training.
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )
    trainer_cfg = runner_cfg.to_sae_trainer_config()
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(x, batch_size, steps, seed))

    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    sae.eval()

    @torch.no_grad()
    def reconstruct(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # With rescale_acts_by_decoder_norm these activations are those of the exported inference SAE,
        # whose decoder rows are unit-norm (`_fold_norm_topk`), so they compare with ours.
        acts = sae.encode(xb)  # [B, F]
        return sae.decode(acts), acts  # [B, D], [B, F]

    info = {
        "version": version("sae-lens"),
        "steps": trainer.n_training_steps,
        "tokens_seen": trainer.n_training_samples,
        "lr": trainer_cfg.lr,
        "lr_scheduler": trainer_cfg.lr_scheduler_name,
        "adam_betas": (trainer_cfg.adam_beta1, trainer_cfg.adam_beta2),
        "aux_loss_coefficient": sae_cfg.aux_loss_coefficient,
        "dead_feature_window_steps": trainer_cfg.dead_feature_window,
        "dead_fraction": trainer.dead_neurons.float().mean().item(),  # by SAELens' own window
        "decoder_init_norm": sae_cfg.decoder_init_norm,
        "rescale_acts_by_decoder_norm": sae_cfg.rescale_acts_by_decoder_norm,
        "normalize_activations": sae_cfg.normalize_activations,
    }
    return Trained("sae-lens", reconstruct, seconds, info)


def train_sparsify(
    x: torch.Tensor,
    d_sae: int,
    k: int,
    tokens: int,
    batch_size: int,
    seed: int = 0,
    *,
    optimizer: str | None = None,
) -> Trained:
    """Trains EleutherAI sparsify's `SparseCoder` (TopK) on x [N, D] with the recipe of its `Trainer`.

    sparsify's `Trainer` harvests from a model and a token dataset itself, so this loop replays what its
    `fit()` does per step for `loss_fn="fvu"` (sparsify/trainer.py), with the defaults of its `TrainConfig`
    (sparsify/config.py) read from the installed package rather than restated:
    - init: `torch.manual_seed` then `SparseCoder(d_in, cfg, dtype=float32)` (encoder: nn.Linear default
      init, zero bias; W_dec = encoder weight, unit-norm rows); b_dec = mean of the first batch.
    - per step: decoder rows renormalised before the forward; loss = fvu + auxk_alpha * auxk_loss +
      multi_topk_fvu / 8 with fvu normalised by the batch's total variance; the gradient component parallel
      to each decoder row removed before the optimizer step.
    - optimizer (released default "signum"): schedule-free SignSGD, `ScheduleFreeWrapper(SignSGD, momentum
      0.95)`, lr = 5e-3 / sqrt(num_latents / 2**14), no schedule; its averaged weights (`opt.eval()`) are the
      ones sparsify saves, so they are the ones evaluated. "adam": torch Adam (their fallback when
      bitsandbytes is absent), lr = 2e-4 / sqrt(num_latents / 2**14), linear warm-up over
      `lr_warmup_steps` then linear decay to zero at the last step. sparsify's main branch has since
      switched its default to Adam (EleutherAI/sparsify#139), after 1.3.3; `optimizer="adam"` gives it.
    - dead latents: tokens since each latent was last among the top k, dead past `dead_feature_threshold`
      (10M tokens); AuxK only runs when `auxk_alpha` > 0, and its default is 0.
    Not replayed: `torch.set_float32_matmul_precision("high")` (no effect on CPU) and the CUDA bf16
    autocast on `SparseCoder.forward` (off on CPU).
    """
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, SparseCoder, TrainConfig
    from sparsify.sign_sgd import SignSGD
    from transformers import get_linear_schedule_with_warmup

    steps = _steps(x, tokens, batch_size)
    cfg = TrainConfig(SaeConfig(num_latents=d_sae, k=k))  # every other field at sparsify's default
    optimizer = optimizer or cfg.optimizer
    torch.manual_seed(seed)
    sae = SparseCoder(x.shape[1], cfg.sae, "cpu", dtype=torch.float32)

    width_scale = math.sqrt(sae.num_latents / 2**14)  # their lr rule, trainer.py `Trainer.__init__`
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
    if optimizer == "signum":
        lr = cfg.lr or 5e-3 / width_scale
        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
        opt.train()
    elif optimizer == "adam":
        lr = cfg.lr or 2e-4 / width_scale
        opt = torch.optim.Adam([{"params": sae.parameters(), "lr": lr}])
        schedulers.append(get_linear_schedule_with_warmup(opt, cfg.lr_warmup_steps, steps))
    else:
        raise ValueError(f"optimizer={optimizer!r}: expected 'signum' (sparsify 1.3.3's default) or 'adam'")

    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)  # [F] tokens since each latent fired
    start = time.perf_counter()
    for step, xb in enumerate(_batches(x, batch_size, steps, seed)):
        if step == 0:
            sae.b_dec.data = xb.mean(0)  # "ensure the preactivations are centered at initialization"
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None  # [F]
        total_variance = (xb - xb.mean(0)).pow(2).sum()
        out = sae(xb, dead_mask=dead, total_variance=total_variance)
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():
            since_fired += len(xb)
            since_fired[out.latent_indices.flatten()] = 0
    if isinstance(opt, ScheduleFreeWrapper):
        opt.eval()  # sparsify's `_checkpoint` switches to the averaged weights before saving
    seconds = time.perf_counter() - start
    sae.eval()

    @torch.no_grad()
    def reconstruct(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_acts, top_indices, _ = sae.encode(xb)  # [B, K], [B, K]
        acts = xb.new_zeros(len(xb), sae.num_latents).scatter_(1, top_indices, top_acts)  # [B, F]
        return sae.decode(top_acts, top_indices), acts  # [B, D], [B, F]

    info = {
        "version": version("eai-sparsify"),
        "steps": steps,
        "tokens_seen": steps * batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "lr_warmup_steps": cfg.lr_warmup_steps if optimizer == "adam" else 0,
        "auxk_alpha": cfg.auxk_alpha,
        "dead_feature_threshold_tokens": cfg.dead_feature_threshold,
        "dead_fraction": (since_fired > cfg.dead_feature_threshold).float().mean().item(),
        "normalize_decoder": cfg.sae.normalize_decoder,
    }
    return Trained("sparsify", reconstruct, seconds, info)


def sparse_synthetic(n: int, d: int, n_dirs: int, active: int, offset: float, seed: int) -> torch.Tensor:
    """x [n, d]: `active` of `n_dirs` fixed random unit directions per row with exponential magnitudes, a
    little noise, and a fixed random offset of norm `offset` (as residual streams have a large mean).
    A TopK SAE with F >= n_dirs and k >= active can explain most of its variance."""
    g = torch.Generator().manual_seed(1234)  # the dictionary and offset are shared by every draw
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)  # [F, D]
    shift = offset * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)  # [D]
    g.manual_seed(seed)
    idx = torch.rand(n, n_dirs, generator=g).topk(active, dim=1).indices  # [n, K]
    mags = torch.empty(n, active).exponential_(generator=g)  # [n, K]
    codes = torch.zeros(n, n_dirs).scatter_(1, idx, mags)  # [n, F]
    return codes @ dirs + shift + 0.01 * torch.randn(n, d, generator=g)


def _evaluate(trained: Trained, x: torch.Tensor) -> dict[str, float]:
    """Held-out FVU (centered) and L0 of a trained peer on x [B, D]."""
    x_hat, acts = trained.reconstruct(x)
    fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return {"fvu": fvu, "l0": (acts > 0).float().sum(1).mean().item()}


if __name__ == "__main__":
    print("installed:", available())
    torch.manual_seed(0)

    def sparse(n: int, offset: float, seed: int) -> torch.Tensor:
        return sparse_synthetic(n, d=64, n_dirs=256, active=4, offset=offset, seed=seed)

    datasets = {  # name: (train [N, D], held-out [B, D], training tokens)
        "gaussian": (torch.randn(20_000, 64), torch.randn(4_096, 64), 50_000),
        "sparse": (sparse(20_000, 0.0, 0), sparse(4_096, 0.0, 1), 1_000_000),
        "sparse+offset": (sparse(20_000, 8.0, 0), sparse(4_096, 8.0, 1), 1_000_000),
    }
    runs: list[tuple[str, str, Callable[..., Trained]]] = [  # (peer, label, trainer)
        ("sae-lens", "sae-lens", train_saelens),
        ("sparsify", "sparsify", train_sparsify),
        ("sparsify", "sparsify/adam", partial(train_sparsify, optimizer="adam")),
    ]
    for data, (train_x, test_x, tokens) in datasets.items():
        for peer, label, train in runs:
            if available()[peer] is None:
                print(f"{label}: not installed, skipped")
                continue
            trained = train(train_x, d_sae=256, k=8, tokens=tokens, batch_size=1024, seed=0)
            m = _evaluate(trained, test_x)
            print(
                f"{data:13s} {label:13s} fvu {m['fvu']:.3f}  l0 {m['l0']:.1f}  train {trained.train_seconds:5.1f} s  "
                f"steps {trained.info['steps']}  lr {trained.info['lr']:.2e}  dead {trained.info['dead_fraction']:.3f}",
                flush=True,
            )
