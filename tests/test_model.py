"""Invariants of the TopK SAE: sparsity, the fast decode path, unit-norm decoder rows, persistence.

SAEs and inputs are made on the CPU (the same numbers everywhere) and moved to the device under test
(`device`, `$SAE_TEST_DEVICE`) where a GPU runs other kernels: the forward and backward passes, training steps,
saving what a GPU holds."""

import json

import pytest
import torch

from sae.metrics import fvu
from sae.model import SAE, Code, read_config

D, F, K = 16, 64, 4


def make_sae(seed: int = 0, b_enc: float = 0.0, device: torch.device | str = "cpu") -> SAE:
    sae = SAE(D, F, K, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
        sae.b_dec.copy_(torch.randn(D, generator=torch.Generator().manual_seed(seed + 1)))
    return sae.to(device)


def rand(*shape: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def test_encode_keeps_exactly_k_largest_latents(device):
    # A large positive b_enc keeps every pre-activation above zero, so ReLU cannot drop any of the K.
    sae = make_sae(b_enc=10.0, device=device)
    x = rand(32, D, device=device)
    code = sae.encode(x)
    assert code.acts.shape == code.idx.shape == (32, K)
    z = sae.dense(code)
    assert ((z != 0).sum(dim=1) == K).all()
    # The K kept latents are the K largest pre-activations, at the right places.
    pre = sae.pre_acts(x)
    ref = pre.topk(K, dim=1)
    torch.testing.assert_close(code.acts.sort(dim=1).values, ref.values.sort(dim=1).values)
    assert (code.idx.sort(dim=1).values == ref.indices.sort(dim=1).values).all()
    torch.testing.assert_close(pre.gather(1, code.idx), code.acts)


def test_encode_has_at_most_k_non_negative_latents_on_typical_data(device):
    sae = make_sae(b_enc=0.0, device=device)
    x = rand(256, D, seed=3, device=device)
    code = sae.encode(x)
    z = sae.dense(code)
    nonzero = (z != 0).sum(dim=1)
    assert (nonzero <= K).all()
    assert (nonzero == K).float().mean() > 0.9  # 64 random directions: almost always >= K positive
    assert (code.acts >= 0).all()
    # Indices within a token are distinct.
    assert all(len(set(row)) == K for row in code.idx.tolist())


def test_relu_zeros_negative_latents_before_topk(device):
    # A negative b_enc leaves fewer than K positive pre-activations on many tokens: those stay at zero.
    sae = make_sae(b_enc=-1.5, device=device)
    x = rand(256, D, seed=5, device=device)
    raw = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [B, F] before ReLU
    code = sae.encode(x)
    assert (code.acts >= 0).all()
    positive = (raw > 0).sum(dim=1).clamp(max=K)
    assert (positive < K).any()
    assert torch.equal((sae.dense(code) > 0).sum(dim=1), positive)


def test_forward_equals_decode_of_encode(device):
    sae = make_sae(b_enc=0.1, device=device)
    x = rand(64, D, seed=1, device=device)
    out = sae(x)
    code = sae.encode(x)
    torch.testing.assert_close(out.x_hat, sae.decode(code), rtol=0, atol=0)
    torch.testing.assert_close(out.acts, code.acts, rtol=0, atol=0)
    assert torch.equal(out.idx, code.idx)
    assert out.x_hat.shape == x.shape


def test_sparse_decode_equals_dense_reference(device):
    sae = make_sae(b_enc=0.5, device=device)
    code = sae.encode(rand(50, D, seed=2, device=device))
    reference = sae.dense(code) @ sae.W_dec + sae.b_dec  # [B, F] @ [F, D]
    torch.testing.assert_close(sae.decode(code), reference, rtol=1e-5, atol=1e-5)


def test_sparse_decode_gradients_equal_dense_reference(device):
    sae = make_sae(b_enc=0.5, device=device)
    x = rand(40, D, seed=4, device=device)

    def grads(decode):
        sae.zero_grad(set_to_none=True)
        code = sae.encode(x)
        fvu(x, decode(code)).backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    fast = grads(sae.decode)
    slow = grads(lambda code: sae.dense(code) @ sae.W_dec + sae.b_dec)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_decode_of_a_hand_made_code():
    sae = make_sae()
    code = Code(acts=torch.tensor([[2.0, 0.5]]), idx=torch.tensor([[3, 7]]))
    expected = 2.0 * sae.W_dec[3] + 0.5 * sae.W_dec[7] + sae.b_dec
    torch.testing.assert_close(sae.decode(code)[0], expected)


def test_initial_decoder_rows_are_unit_norm_and_encoder_is_transpose():
    sae = SAE(D, F, K, seed=5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert not torch.equal(SAE(D, F, K, seed=6).W_dec, sae.W_dec)
    assert torch.equal(SAE(D, F, K, seed=5).W_dec, sae.W_dec)


def test_normalize_decoder_gives_unit_rows():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(F, 1, generator=torch.Generator().manual_seed(0)) * 5 + 0.1)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(F))
    direction = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F))
    torch.testing.assert_close(sae.W_dec, direction)  # only the norm changed


def test_decoder_rows_stay_unit_norm_through_training_steps(device):
    sae = make_sae(b_enc=0.1, device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    before = sae.W_dec.detach().clone()
    for step in range(5):
        x = rand(64, D, seed=10 + step, device=device)
        out = sae(x)
        opt.zero_grad()
        fvu(x, out.x_hat).backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(F, device=device))
    assert (sae.W_dec - before).abs().max() > 1e-3  # the steps did move the decoder


def test_remove_parallel_grad_leaves_orthogonal_gradients(device):
    sae = make_sae(b_enc=0.1, device=device)
    x = rand(64, D, seed=7, device=device)
    fvu(x, sae(x).x_hat).backward()
    grad = sae.W_dec.grad.clone()
    along = (grad * sae.W_dec).sum(dim=1)
    assert along.abs().max() > 1e-4  # the raw gradient does have a parallel part
    sae.remove_parallel_grad()
    after = sae.W_dec.grad
    torch.testing.assert_close(
        (after * sae.W_dec).sum(dim=1), torch.zeros(F, device=device), atol=1e-7, rtol=0
    )
    # Exactly the parallel part is removed.
    torch.testing.assert_close(after, grad - along[:, None] * sae.W_dec)


def test_remove_parallel_grad_without_gradient_is_a_no_op():
    sae = make_sae()
    sae.remove_parallel_grad()
    assert sae.W_dec.grad is None


def test_save_load_round_trip(tmp_path, device):
    sae = make_sae(seed=3, b_enc=0.2, device=device)
    with torch.no_grad():
        sae.W_enc.add_(0.01 * rand(D, F, seed=9, device=device))  # no longer the decoder's transpose
    extra = {"hook": "model.layers.2", "model": "tiny", "d_in": D}
    sae.save(tmp_path / "run", extra=extra)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"sae.safetensors", "cfg.json"}
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg == {"arch": "topk", "d_in": D, "d_sae": F, "k": K} | extra
    assert read_config(tmp_path / "run") == cfg

    loaded = SAE.load(tmp_path / "run", device=device)
    assert (loaded.d_in, loaded.d_sae, loaded.k) == (D, F, K)
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    x = rand(20, D, seed=8, device=device)
    a, b = sae(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.idx, b.idx) and torch.equal(a.acts, b.acts)

    # Saving again over the same directory replaces the files and leaves no temporary ones.
    loaded.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "cfg.json").read_text()) == loaded.config()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("k", [64, 65, 0, -1])
def test_bad_k_raises_naming_k(k):
    with pytest.raises(ValueError, match=rf"sae\.k={k}\b.*d_sae={F}"):
        SAE(D, F, k)


def test_largest_valid_k():
    sae = SAE(D, F, F - 1)
    assert sae.encode(rand(3, D)).acts.shape == (3, F - 1)


def test_load_from_empty_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        SAE.load(tmp_path)


def test_load_without_config_raises(tmp_path):
    make_sae().save(tmp_path)
    (tmp_path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SAE.load(tmp_path)


def _dense_topk_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor, auxk_coef: float) -> torch.Tensor:
    """The TopK training loss (FVU, L(4k)/8, AuxK) written densely: the reference for the sparse kernels."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # [B, F]

    def top(p, k):
        v, i = p.topk(k, dim=1)
        return torch.zeros_like(p).scatter(1, i, v)

    x_hat = top(pre, K) @ sae.W_dec + sae.b_dec
    loss = fvu(x, x_hat) + fvu(x, top(pre, 4 * K) @ sae.W_dec + sae.b_dec) / 8
    is_dead = torch.zeros(F, dtype=torch.bool, device=x.device)
    is_dead[dead] = True
    e_hat = top(pre.masked_fill(~is_dead, -1e9), min(D // 2, len(dead))).clamp_min(0) @ sae.W_dec
    return loss + auxk_coef * fvu((x - x_hat).detach(), e_hat)


def test_sparse_topk_step_has_the_dense_gradients(device):
    # The sparse encoder backward and the embedding-bag decoder give every parameter the gradient of the
    # dense computation, AuxK and Multi-TopK included.
    sae = make_sae(seed=3, b_enc=0.1, device=device)
    ref = make_sae(seed=3, b_enc=0.1, device=device)
    x = 2 * rand(64, D, seed=4, device=device)
    dead = torch.tensor([3, 5, 17, 40, 63], device=device)
    out = sae.step(x, dead, auxk_coef=0.5, multi_topk=True)
    assert set(out.losses) == {"fvu", "fvu_4k", "auxk"}
    torch.stack(list(out.losses.values())).sum().backward()
    loss = _dense_topk_loss(ref, x, dead, 0.5)
    loss.backward()
    torch.testing.assert_close(sum(out.losses.values()), loss)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_latent_chosen_twice_gets_both_gradients(device):
    # A dead latent can be among a token's top k and among its AuxK candidates: its two gradients add up.
    sae = make_sae(seed=5, b_enc=10.0, device=device)  # every pre-activation positive
    x = rand(8, D, seed=6, device=device)
    top = sae.pre_acts(x).topk(K, dim=1).indices[:, 0]  # one latent each token keeps
    dead = top.unique()
    out = sae.step(x, dead, auxk_coef=1.0)
    torch.stack(list(out.losses.values())).sum().backward()
    ref = make_sae(seed=5, b_enc=10.0, device=device)
    pre = torch.relu((x - ref.b_dec) @ ref.W_enc + ref.b_enc)
    v, i = pre.topk(K, dim=1)
    x_hat = torch.zeros_like(pre).scatter(1, i, v) @ ref.W_dec + ref.b_dec
    is_dead = torch.zeros(F, dtype=torch.bool, device=device)
    is_dead[dead] = True
    va, ia = pre.masked_fill(~is_dead, -1e9).topk(min(D // 2, len(dead)), dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, ia, va.clamp_min(0)) @ ref.W_dec
    (fvu(x, x_hat) + fvu((x - x_hat).detach(), e_hat)).backward()
    torch.testing.assert_close(sae.encoder.grad, ref.encoder.grad)
    torch.testing.assert_close(sae.b_enc.grad, ref.b_enc.grad)


def test_bf16_step_keeps_fp32_weights_and_is_close_to_fp32(device):
    sae = make_sae(seed=7, b_enc=0.1, device=device)
    x = 2 * rand(256, D, seed=8, device=device)
    exact = sae.step(x)
    exact.losses["fvu"].backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mixed = sae.step(x)
    assert mixed.losses["fvu"].dtype == mixed.x_hat.dtype == torch.float32
    mixed.losses["fvu"].backward()
    torch.testing.assert_close(mixed.losses["fvu"], exact.losses["fvu"], rtol=0.02, atol=0)
    for name, p in sae.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads[name].flatten(), dim=0)
        assert cos > 0.98, name
