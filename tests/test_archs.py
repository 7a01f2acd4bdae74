"""Each architecture's invariants: what its activation and loss terms must do, and that it trains.

Data is made on the CPU and moved to the device under test (`device`, `$SAE_TEST_DEVICE`), where the SAEs
train and run."""

import copy

import pytest
import torch

from sae.config import ARCHS, SAEConfig, TrainConfig
from sae.metrics import fvu
from sae.model import SAE, batch_topk, sparse
from sae.train import train

D, F, K, B = 16, 64, 4, 256


def sparse_data(seed: int = 0, n_atoms: int = 48, active: int = 3):
    """Endless [B, D] batches: sparse non-negative codes over a fixed random unit-norm dictionary, plus an
    offset; `seed` picks the codes."""
    g = torch.Generator().manual_seed(1234)
    atoms = torch.randn(n_atoms, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    offset = torch.randn(D, generator=g)
    g.manual_seed(seed)
    while True:
        idx = torch.rand(B, n_atoms, generator=g).argsort(dim=1)[:, :active]
        z = torch.zeros(B, n_atoms).scatter_(1, idx, 1 + 2 * torch.rand(B, active, generator=g))
        yield 5 * (z @ atoms + offset)


def trained(
    arch: str, steps: int = 120, device: torch.device | str = "cpu", **sae_kw
) -> tuple[SAE, dict[int, dict]]:
    logged: dict[int, dict] = {}
    cfg = TrainConfig(tokens=steps * B, batch_size=B, warmup_steps=5, log_every=20, dead_tokens=10**9, seed=1)
    sae_cfg = SAEConfig(arch=arch, expansion_factor=F // D, k=K, **sae_kw)
    sae = train(sae_cfg, cfg, sparse_data(), log=lambda m, s: logged.__setitem__(s, m), device=device)
    return sae, logged


def x_batch(seed: int = 3, device: torch.device | str = "cpu") -> torch.Tensor:
    return next(sparse_data(seed)).to(device)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_and_reloads(arch, tmp_path, device):
    sae, logged = trained(arch, device=device)
    first, last = logged[0], logged[max(logged)]
    assert last["train/fvu"] < 0.5 * first["train/fvu"], (first, last)
    x = x_batch(device=device)
    out = sae(x)
    assert fvu(x, out.x_hat) < 0.35
    # The saved SAE takes raw activations and reloads to the same outputs.
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path, device=device)
    assert loaded.arch == arch
    again = loaded(x)
    torch.testing.assert_close(again.x_hat, out.x_hat)
    assert torch.equal(loaded.dense(sae.encode(x)), sae.dense(loaded.encode(x)))


def test_topk_code_has_exactly_k_and_multi_topk_adds_the_4k_term(device):
    sae = SAE(D, F, K, seed=2).to(device)
    x = x_batch(device=device)
    plain = sae.step(x)
    assert set(plain.losses) == {"fvu"} and plain.code.idx.shape == (B, K)
    assert plain.l0 == (plain.code.acts > 0).sum(dim=1).float().mean() <= K
    assert plain.fired.sum() == (plain.code.acts > 0).sum()
    multi = sae.step(x, multi_topk=True)
    torch.testing.assert_close(multi.losses["fvu"], plain.losses["fvu"])
    acts, idx = sae.pre_acts(x).topk(4 * K, dim=1)
    x_hat_4k = sae.decode(sparse(torch.zeros(B, F, device=device).scatter(1, idx, acts)))
    torch.testing.assert_close(multi.losses["fvu_4k"], fvu(x, x_hat_4k) / 8)


def test_batch_topk_keeps_k_per_token_on_average(device):
    pre = torch.rand(32, F).to(device)
    z, smallest = batch_topk(pre, K)
    assert int((z > 0).sum()) == 32 * K
    assert smallest == z[z > 0].min()
    # Exactly the k x B largest entries of the batch survive, wherever they are.
    assert z[z > 0].min() >= pre[z == 0].max()


def test_batchtopk_inference_threshold_gives_the_training_l0(device):
    sae, logged = trained("batchtopk", steps=200, device=device)
    assert float(sae.threshold) > 0
    assert logged[max(logged)]["train/l0"] == pytest.approx(K, abs=1e-6)
    l0 = (sae.encode(x_batch(seed=7, device=device)).acts > 0).sum(dim=1).float().mean().item()
    assert l0 == pytest.approx(K, rel=0.25)
    # A token's code does not depend on the rest of its batch at inference.
    x = x_batch(seed=8, device=device)
    alone, in_batch = sae.dense(sae.encode(x[:1])), sae.dense(sae.encode(x))[:1]
    torch.testing.assert_close(alone, in_batch)
    assert torch.equal(alone > 0, in_batch > 0)


def test_jumprelu_thresholds_receive_gradient_and_move(device):
    sae = SAE(D, F, K, arch="jumprelu", bandwidth=0.5, seed=0).to(device)
    x = x_batch(device=device)
    pre = sae.pre_acts(x)
    with torch.no_grad():
        sae.threshold.copy_(pre.median(dim=0).values)  # many pre-activations within the kernel
    step = sae.step(x, None, sparsity_coef=0.1)
    assert set(step.losses) == {"fvu", "l0_penalty"}
    sum(step.losses.values()).backward()
    assert sae.threshold.grad is not None and (sae.threshold.grad != 0).sum() > F // 2
    # The L0 term alone pushes every threshold up (fewer active latents), never down.
    sae.zero_grad()
    sae.step(x, None, sparsity_coef=0.1).losses["l0_penalty"].backward()
    assert (sae.threshold.grad <= 0).all() and (sae.threshold.grad < 0).any()
    # z is pre where pre > theta and 0 elsewhere.
    theta = sae.threshold.detach()
    torch.testing.assert_close(step.z.detach(), pre.detach() * (pre.detach() > theta))

    trained_sae, _ = trained("jumprelu", steps=40, device=device)
    assert (trained_sae.threshold - 0.001).abs().max() > 0.01  # thresholds left their start
    # They move at their own learning rate, train.lr * sae.threshold_lr_scale.
    frozen, _ = trained("jumprelu", steps=40, device=device, threshold_lr_scale=1e-6)
    assert (frozen.threshold - 0.001).abs().max() < 1e-4


def test_jumprelu_heaviside_has_the_rectangle_kernel_gradient():
    sae = SAE(1, 2, 1, arch="jumprelu", bandwidth=0.2)
    with torch.no_grad():
        sae.threshold.fill_(1.0)
    pre = torch.tensor([[0.95, 1.5], [1.05, 0.5]], requires_grad=True)
    from sae.model import _Heaviside

    _Heaviside.apply(pre, sae.threshold, 0.2).sum().backward()
    # Latent 0: both values lie within eps/2 = 0.1 of theta -> -2/eps; latent 1: none.
    torch.testing.assert_close(sae.threshold.grad, torch.tensor([-2 / 0.2, 0.0]))
    assert pre.grad is None or (pre.grad == 0).all()


def test_matryoshka_prefix_losses_are_each_prefix_reconstructing_alone(device):
    sae = SAE(D, F, K, arch="matryoshka", prefixes=(8, 24, F), seed=4).to(device)
    x = x_batch(device=device)
    step = sae.step(x, None)
    z = step.z.detach()
    ref = sum(fvu(x, z[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in (8, 24))
    torch.testing.assert_close(step.losses["prefix_fvu"], ref)
    torch.testing.assert_close(step.losses["fvu"], fvu(x, z @ sae.W_dec + sae.b_dec))
    # The first prefix's loss reaches only the first prefix's decoder rows.
    sae.zero_grad()
    fvu(x, step.z[:, :8] @ sae.W_dec[:8] + sae.b_dec).backward(retain_graph=True)
    assert (sae.W_dec.grad[8:] == 0).all() and (sae.W_dec.grad[:8] != 0).any()


@pytest.mark.parametrize("prefixes", [(8, 4, F), (0, F), (8, 32)])
def test_bad_matryoshka_prefixes_raise(prefixes):
    with pytest.raises(ValueError, match="prefixes"):
        SAE(D, F, K, arch="matryoshka", prefixes=prefixes)


def test_relu_l1_is_weighted_by_decoder_norms(device):
    sae = SAE(D, F, K, arch="relu", seed=5).to(device)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, F, device=device)[:, None])  # rows of different norms
    x = x_batch(device=device)
    step = sae.step(x, None, sparsity_coef=0.01)
    z = sae.pre_acts(x)
    torch.testing.assert_close(
        step.losses["l1_penalty"], 0.01 * (z * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    )
    # Doubling one row doubles its latent's share of the penalty: shrinking the decoder cannot hide activity.
    share = 0.01 * (z[:, 7] * sae.W_dec[7].norm()).mean()
    with torch.no_grad():
        sae.W_dec[7] *= 2
    doubled = sae.step(x, None, sparsity_coef=0.01).losses["l1_penalty"]
    torch.testing.assert_close(doubled - step.losses["l1_penalty"], share)


def test_relu_decoder_is_unconstrained_and_others_unit_norm(device):
    relu, _ = trained("relu", steps=40, device=device)
    norms = relu.W_dec.norm(dim=1)
    assert norms.std() / norms.mean() > 0.05  # rows drifted apart: no unit-norm projection
    topk = SAE(D, F, K)
    assert topk.unit_decoder and not relu.unit_decoder


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_the_input_scale_gives_the_same_reconstruction_in_raw_units(arch, device):
    sae = SAE(D, F, K, arch=arch, seed=6).to(device)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.3)
        sae.b_dec.normal_()
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.2)
    x = x_batch(device=device) / 5
    scale = 2.5
    expected = sae(x * scale).x_hat / scale
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(scale)
    torch.testing.assert_close(folded(x).x_hat, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.pre_acts(x), sae.pre_acts(x * scale), rtol=1e-4, atol=1e-4)


def test_sparse_code_round_trips_a_dense_one(device):
    z = torch.relu(torch.randn(10, F) - 1.0).to(device)
    code = sparse(z)
    assert code.acts.shape[1] == int((z > 0).sum(dim=1).max())
    assert torch.equal(SAE(D, F, K).to(device).dense(code), z)
    assert sparse(torch.zeros(3, F, device=device)).acts.shape == (
        3,
        1,
    )  # nothing active: one zero-padded slot
