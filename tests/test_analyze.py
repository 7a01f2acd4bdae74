"""Streaming per-feature statistics from the sparse code against brute force over the dense latents, planted top
contexts, and the saved analysis."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sae import harvest
from sae.analyze import (
    HIST_BINS,
    FeatureStats,
    band,
    logit_lens,
    nearest_features,
    rebin_histogram,
    save_analysis,
    token_strings,
)
from sae.config import AnalyzeConfig, DataConfig
from sae.data import Contexts, packed_contexts
from sae.harvest import tiny_model
from sae.model import SAE, Code, sparse

RAW = {"per_context": 0, "skip_positions": 0}
"""Every position and every example counts: what the brute-force references compute."""
N, T, F = 3, 10, 4
BEFORE, AFTER = 3, 2
CFG = AnalyzeConfig(**RAW, top_k=3, window_before=BEFORE, window_after=AFTER)
# feature -> (batch, n, t, value): one at the left edge, one at the right edge, one in the middle.
PLANTED = {0: (1, 0, 1, 50.0), 1: (2, 1, T - 1, 40.0), 2: (0, 1, 5, 30.0)}


def make_batch(b: int, g: torch.Generator) -> Contexts:
    ids = torch.randint(2, 258, (N, T), generator=g)
    ids[:, 0] = 0  # BOS
    ids[2, 6] = 1  # an EOS inside the context
    mask = ids > 1
    row = torch.where(mask, 100 * b + torch.arange(N)[:, None], -1)
    pos = torch.where(mask, torch.arange(T) + 1000 * b, -1)
    return Contexts(ids=ids, row=row, pos=pos, mask=mask)


def make_latents(batch: Contexts, b: int, g: torch.Generator) -> torch.Tensor:
    z = torch.rand(N, T, F, generator=g) * (torch.rand(N, T, F, generator=g) < 0.6)
    z[~batch.mask] = 0
    for f, (pb, n, t, value) in PLANTED.items():
        if pb == b:
            z[n, t, f] = value
    return z


def update(stats: FeatureStats, z: torch.Tensor, batch: Contexts) -> None:
    """Folds dense latents z [N, T, F] of the text tokens (zero elsewhere) in as a sparse code."""
    stats.update(sparse(z[batch.mask]), batch.mask, batch)


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(b, g) for b in range(5)]
    return [(make_latents(batch, b, g), batch) for b, batch in enumerate(batches)]


@pytest.fixture(scope="module")
def stats(stream) -> FeatureStats:
    stats = FeatureStats(F, CFG)
    for z, batch in stream:
        update(stats, z, batch)
    return stats


def window(batch: Contexts, z: torch.Tensor, n: int, t: int, f: int) -> tuple[list[int], list[float]]:
    ids, acts = [], []
    for u in range(t - BEFORE, t + AFTER + 1):
        inside = 0 <= u < T
        ids.append(batch.ids[n, u].item() if inside else -1)
        acts.append(z[n, u, f].item() if inside else 0.0)
    return ids, acts


def brute_force(stream, f: int) -> list[tuple[float, int, int, list[int], list[float]]]:
    """Every (act, row, pos, window ids, window acts) of feature f, strongest first."""
    found = []
    for z, batch in stream:
        for n in range(N):
            for t in range(T):
                if z[n, t, f] > 0:
                    found.append(
                        (
                            z[n, t, f].item(),
                            batch.row[n, t].item(),
                            batch.pos[n, t].item(),
                            *window(batch, z, n, t, f),
                        )
                    )
    return sorted(found, key=lambda e: -e[0])


@pytest.mark.parametrize("f", sorted(PLANTED))
def test_planted_example_is_the_top_one(stream, stats, f):
    b, n, t, value = PLANTED[f]
    z, batch = stream[b]
    s = stats.tensors()
    assert s["top_act"][f, 0] == value
    assert s["top_row"][f, 0] == 100 * b + n and s["top_pos"][f, 0] == 1000 * b + t
    ids, acts = window(batch, z, n, t, f)
    assert s["window_ids"][f, 0].tolist() == ids
    torch.testing.assert_close(s["window_acts"][f, 0], torch.tensor(acts))
    assert s["window_ids"][f, 0, BEFORE] == batch.ids[n, t]
    assert s["window_acts"][f, 0, BEFORE] == value


def test_windows_at_the_context_edges():
    g = torch.Generator().manual_seed(0)
    assert PLANTED[0][2] == 1 and PLANTED[1][2] == T - 1
    stats = FeatureStats(F, CFG)
    for b in range(3):
        batch = make_batch(b, g)
        update(stats, make_latents(batch, b, g), batch)
    s = stats.tensors()
    assert s["window_ids"][0, 0, :2].tolist() == [-1, -1]  # t = 1: two positions before the context
    assert s["window_ids"][0, 0, 2] == 0  # then the BOS, with no activation
    assert s["window_acts"][0, 0, :3].tolist() == [0.0, 0.0, 0.0]
    assert s["window_ids"][1, 0, -AFTER:].tolist() == [-1] * AFTER  # t = T - 1: nothing after


@pytest.mark.parametrize("f", range(F))
def test_top_examples_equal_brute_force(stream, stats, f):
    expected = brute_force(stream, f)[: CFG.top_k]
    assert len(expected) == CFG.top_k
    s = stats.tensors()
    for j, (act, row, pos, ids, acts) in enumerate(expected):
        assert s["top_act"][f, j].item() == pytest.approx(act)
        assert (s["top_row"][f, j].item(), s["top_pos"][f, j].item()) == (row, pos)
        assert s["window_ids"][f, j].tolist() == ids
        torch.testing.assert_close(s["window_acts"][f, j], torch.tensor(acts))


def test_density_mean_and_max(stream, stats):
    z = torch.stack([z for z, _ in stream])  # [batches, N, T, F]
    tokens = sum(int(batch.mask.sum()) for _, batch in stream)
    assert stats.tokens == tokens
    s = stats.tensors()
    count = (z > 0).sum(dim=(0, 1, 2)).float()
    torch.testing.assert_close(s["density"], count / tokens)
    torch.testing.assert_close(s["max_act"], z.amax(dim=(0, 1, 2)))
    torch.testing.assert_close(s["mean_act"], z.sum(dim=(0, 1, 2)) / count)
    assert s["max_act"][:3].tolist() == [50.0, 40.0, 30.0]
    assert set(s) == {
        "density",
        "max_act",
        "mean_act",
        "top_act",
        "top_row",
        "top_pos",
        "window_ids",
        "window_acts",
        "interval_act",
        "interval_row",
        "interval_pos",
        "interval_window_ids",
        "interval_window_acts",
        "interval_count",
        "hist_counts",
        "hist_edges",
    }
    assert s["window_ids"].shape == (F, CFG.top_k, BEFORE + 1 + AFTER)


def test_fewer_tokens_than_top_k_and_dead_features():
    cfg = AnalyzeConfig(**RAW, top_k=5, window_before=1, window_after=1)
    stats = FeatureStats(2, cfg)
    ids = torch.tensor([[0, 7]])
    batch = Contexts(ids=ids, row=torch.tensor([[-1, 4]]), pos=torch.tensor([[-1, 0]]), mask=ids > 1)
    update(stats, torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]), batch)
    update(stats, torch.tensor([[[0.0, 0.0], [3.0, 0.0]]]), batch)
    s = stats.tensors()
    assert s["top_act"][0].tolist() == [3.0, 2.0, 0.0, 0.0, 0.0]
    assert s["top_act"][1].tolist() == [0.0] * 5  # a dead feature has only empty slots
    assert s["top_row"][0].tolist() == [4, 4, -1, -1, -1] and (s["top_row"][1] == -1).all()
    assert s["window_ids"][0, 0].tolist() == [0, 7, -1]
    assert s["density"].tolist() == [1.0, 0.0]
    assert s["mean_act"].tolist() == [2.5, 0.0]
    assert s["interval_count"].tolist() == [[0] * 6 + [1, 0, 0, 1], [0] * 10]  # 2 and 3 in bands of (0, 3]
    assert s["interval_act"][0, 6, 0] == 2.0 and s["interval_act"][0, 9, 0] == 3.0
    assert s["interval_row"][0, 6].tolist() == [4, -1, -1, -1] and s["interval_window_ids"][
        0, 9, 0
    ].tolist() == [0, 7, -1]


# --- the sparse update against a dense reference ---------------------------------------------------------


def random_code(
    used: torch.Tensor, b: int, g: torch.Generator, f_: int, k_: int
) -> tuple[Code, torch.Tensor]:
    """A code of the B used tokens: k_ distinct latents each, drawn mostly from a few frequent ones, some of
    them zero (padding, whose index may repeat a live latent of the token), acts on a coarse grid (exact ties)
    growing with b for even latents (later batches replace the top-k) and shrinking for odd ones. Returns
    (code, the dense z [N, T, F] it stands for)."""
    B = int(used.sum())
    weights = torch.ones(f_)
    weights[:3] = 20.0  # frequent latents: their top-k fills in the first batch and turns over later
    idx = torch.multinomial(weights.expand(B, -1), k_, generator=g)  # [B, K] distinct per token
    grid = torch.randint(1, 9, (B, k_), generator=g) / 8  # ties
    growth = torch.where(idx % 2 == 0, 1.0 + 0.5 * b, 1.0 / (1 + b))
    acts = grid * growth * (torch.rand(B, k_, generator=g) < 0.7)  # [B, K], zeros are padding
    pad = acts == 0
    idx = torch.where(pad & (torch.rand(B, k_, generator=g) < 0.5), idx[:, -1:], idx)  # repeat a latent
    z = torch.zeros(*used.shape, f_)
    live = acts > 0
    rows = torch.arange(B)[:, None].expand_as(idx)[live]
    z_used = torch.zeros(B, f_)
    z_used[rows, idx[live]] = acts[live]
    z[used] = z_used
    return Code(acts, idx), z


def check_against_reference(stats: FeatureStats, stream, f_: int, top_k: int) -> None:
    """Each latent's kept examples are the top_k strongest of brute force (ties broken either way), each with
    the window of its own (row, pos); empty slots are empty."""
    s = stats.tensors()
    for f in range(f_):
        expected = brute_force(stream, f)
        by_token = {(row, pos): (act, ids, acts) for act, row, pos, ids, acts in expected}
        n_kept = min(top_k, len(expected))
        assert s["top_act"][f].tolist() == sorted(s["top_act"][f].tolist(), reverse=True)
        assert s["top_act"][f, :n_kept].tolist() == [e[0] for e in expected[:n_kept]]
        kept = list(zip(s["top_row"][f, :n_kept].tolist(), s["top_pos"][f, :n_kept].tolist()))
        assert len(set(kept)) == n_kept
        for j, token in enumerate(kept):
            act, ids, acts = by_token[token]
            assert act == s["top_act"][f, j].item()
            assert s["window_ids"][f, j].tolist() == ids
            assert s["window_acts"][f, j].tolist() == acts
        assert (s["top_act"][f, n_kept:] == 0).all() and (s["top_row"][f, n_kept:] == -1).all()
        assert (s["top_pos"][f, n_kept:] == -1).all() and (s["window_ids"][f, n_kept:] == -1).all()
        assert (s["window_acts"][f, n_kept:] == 0).all()


def fine_bin(stats: FeatureStats, act: float) -> int:
    return int(torch.bucketize(torch.tensor(act), stats.hist_edges, right=True).clamp(1, HIST_BINS)) - 1


def check_bands_against_reference(stats: FeatureStats, stream, f_: int) -> None:
    """Each band of (0, max] holds at most per_interval distinct tokens of that band, each with the act, window
    and provenance of brute force, largest act first, empty slots last; the band's count is within the fine
    bins at its edges of the true count; the fine histogram is torch.histogram's."""
    s = stats.tensors()
    nb, n = stats.cfg.intervals, stats.cfg.per_interval
    for f in range(f_):
        expected = brute_force(stream, f)
        top = expected[0][0]
        assert s["max_act"][f].item() == top
        fine = torch.histogram(torch.tensor([e[0] for e in expected]), stats.hist_edges).hist.int()
        assert torch.equal(s["hist_counts"][f], fine) and fine.sum() == stats.count[f] == len(expected)
        bands: list[list] = [[] for _ in range(nb)]
        for e in expected:
            bands[int(band(torch.tensor(e[0]), torch.tensor(top), nb))].append(e)
        for j, in_band in enumerate(bands):
            lo, hi = top * j / nb, top * (j + 1) / nb
            assert all(lo < e[0] <= hi * (1 + 1e-6) for e in in_band)
            by_token = {(row, pos): (act, ids, acts) for act, row, pos, ids, acts in in_band}
            acts = s["interval_act"][f, j]
            kept = int((acts > 0).sum())
            assert kept <= min(n, len(in_band)) and acts.tolist() == sorted(acts.tolist(), reverse=True)
            rows, positions = s["interval_row"][f, j], s["interval_pos"][f, j]
            tokens = list(zip(rows[:kept].tolist(), positions[:kept].tolist()))
            assert len(set(tokens)) == kept
            for i, token in enumerate(tokens):
                act, ids, window_acts = by_token[token]
                assert act == acts[i].item() and lo < act <= hi * (1 + 1e-6)
                assert s["interval_window_ids"][f, j, i].tolist() == ids
                assert s["interval_window_acts"][f, j, i].tolist() == window_acts
            assert (rows[kept:] == -1).all() and (positions[kept:] == -1).all()
            assert (s["interval_window_ids"][f, j, kept:] == -1).all()
            assert (s["interval_window_acts"][f, j, kept:] == 0).all()
            slack = fine[fine_bin(stats, lo)] + fine[fine_bin(stats, hi)] if j else fine[fine_bin(stats, hi)]
            assert abs(s["interval_count"][f, j] - len(in_band)) <= slack
            assert s["interval_count"][f, j] >= kept


def test_sparse_update_equals_dense_reference_batch_by_batch():
    g = torch.Generator().manual_seed(1)
    f_, k_, top_k = 12, 5, 4
    stats = FeatureStats(f_, AnalyzeConfig(**RAW, top_k=top_k, window_before=BEFORE, window_after=AFTER))
    stream, edges = [], 0
    for b in range(6):
        batch = make_batch(b, g)
        used = batch.mask & (torch.rand(N, T, generator=g) > 0.1)  # some text tokens dropped as outliers
        code, z = random_code(used, b, g, f_, k_)
        stats.update(code, used, batch)
        stream.append((z, batch))
        check_against_reference(stats, stream, f_, top_k)
        edges += int((z[:, 1] > 0).sum() + (z[:, T - 1] > 0).sum())
    assert edges > 0  # windows clipped at both ends were exercised
    assert (stats.top_act > 0).all()  # every top-k filled up
    check_bands_against_reference(stats, stream, f_)
    dense = torch.stack([z for z, _ in stream])  # [batches, N, T, F]
    count = (dense > 0).sum(dim=(0, 1, 2)).float()
    s = stats.tensors()
    assert stats.tokens == sum(int(batch.mask.sum()) for _, batch in stream)
    torch.testing.assert_close(s["density"], count / stats.tokens)
    torch.testing.assert_close(s["max_act"], dense.amax(dim=(0, 1, 2)))
    torch.testing.assert_close(s["mean_act"], dense.sum(dim=(0, 1, 2)) / count)


def test_top_examples_take_one_per_context_and_skip_the_first_positions():
    """`per_context=1`: a feature's top examples are the strongest of distinct contexts; `skip_positions=s`:
    positions 1..s after BOS count nowhere (density, max, examples), as the dense reference without them."""
    g = torch.Generator().manual_seed(3)
    f_, k_, top_k, skip = 12, 5, 4, 2
    cfg = {"top_k": top_k, "window_before": BEFORE, "window_after": AFTER, "skip_positions": skip}
    stats = FeatureStats(f_, AnalyzeConfig(**cfg, per_context=1))
    every = FeatureStats(f_, AnalyzeConfig(**cfg, per_context=0))
    stream = []
    for b in range(6):
        batch = make_batch(b, g)
        code, z = random_code(batch.mask, b, g, f_, k_)
        stats.update(code, batch.mask, batch)
        every.update(code, batch.mask, batch)
        stream.append((z, batch))
    s = stats.tensors()
    seen = torch.stack([z for z, _ in stream])[:, :, skip + 1 :]  # [batches, N, T - 1 - skip, F]
    assert stats.tokens == sum(int(batch.mask[:, skip + 1 :].sum()) for _, batch in stream)
    count = (seen > 0).sum(dim=(0, 1, 2)).float()
    torch.testing.assert_close(s["density"], count / stats.tokens)
    torch.testing.assert_close(s["max_act"], seen.amax(dim=(0, 1, 2)))
    strongest = seen.amax(dim=2).reshape(-1, f_)  # [contexts, F]: each context's strongest act
    for f in range(f_):
        expected = strongest[:, f].sort(descending=True).values[:top_k]
        expected = expected[expected > 0]
        n = len(expected)
        assert s["top_act"][f, :n].tolist() == expected.tolist()
        rows = s["top_row"][f, :n].tolist()  # make_batch gives each context its own row
        assert len(set(rows)) == n
        assert (s["top_pos"][f, :n] % 1000 > skip).all()  # pos = 1000 b + t
    repeated = [f for f in range(f_) if len(set(every.tensors()["top_row"][f].tolist())) < top_k]
    assert repeated  # without the limit, contexts repeat: the limit was put to work


def test_update_with_no_live_latents_and_a_code_that_does_not_fit_used():
    batch = make_batch(0, torch.Generator().manual_seed(2))
    stats = FeatureStats(F, CFG)
    B = int(batch.mask.sum())
    stats.update(Code(torch.zeros(B, 2), torch.zeros(B, 2, dtype=torch.long)), batch.mask, batch)
    assert stats.tokens == B and (stats.count == 0).all() and (stats.top_row == -1).all()
    with pytest.raises(ValueError, match=f"holds {B - 1} tokens but `used` marks {B} positions"):
        stats.update(Code(torch.ones(B - 1, 2), torch.zeros(B - 1, 2, dtype=torch.long)), batch.mask, batch)


# --- saving ---------------------------------------------------------------------------------------------


@pytest.fixture
def text_stats(tokenizer):
    """Two features on one context of real text: feature 0 fires on 'c' of 'cat' and on the first token."""
    text = "The cat sat on the mat."
    ids = torch.tensor([[0, *tokenizer(text, add_special_tokens=False)["input_ids"], 1]])  # [1, T]
    mask = ids > 1
    T_ = ids.shape[1]
    row = torch.where(mask, 7, -1)
    pos = torch.where(mask, torch.arange(T_) - 1, -1)
    z = torch.zeros(1, T_, 2)
    c = text.index("cat") + 1  # +1 for the BOS
    z[0, c, 0], z[0, c + 1, 0], z[0, 1, 0] = 3.0, 0.5, 1.0
    stats = FeatureStats(2, AnalyzeConfig(**RAW, top_k=3, window_before=3, window_after=2))
    update(stats, z, Contexts(ids=ids, row=row, pos=pos, mask=mask))
    return stats, c


def test_save_analysis_writes_examples_centered_on_the_activating_token(tmp_path, tokenizer, text_stats):
    stats, c = text_stats
    out = save_analysis(stats, tmp_path, tokenizer, {"model": "tiny", "hook": "model.layers.2"})
    assert out == tmp_path / "analysis"
    data = json.loads((out / "features.json").read_text())
    assert data["model"] == "tiny" and data["hook"] == "model.layers.2"
    assert data["n_tokens"] == stats.tokens and data["window"] == [3, 2]
    f0, f1 = data["features"]
    assert f1["examples"] == [] and f1["density"] == 0.0
    assert [e["act"] for e in f0["examples"]] == [3.0, 1.0, 0.5]

    top = f0["examples"][0]
    assert (top["row"], top["pos"]) == (7, c - 1)
    assert top["tokens"] == list("he cat") and top["center"] == 3
    assert top["tokens"][top["center"]] == "c" and top["acts"][top["center"]] == 3.0
    assert top["acts"] == [0.0, 0.0, 0.0, 3.0, 0.5, 0.0]

    edge = f0["examples"][1]  # the first text token: two window slots fall before the context
    assert edge["tokens"] == ["<bos>", "T", "h", "e"]
    assert edge["center"] == 1 and edge["tokens"][edge["center"]] == "T"
    assert len(edge["tokens"]) == len(edge["acts"])

    tensors = load_file(str(out / "features.safetensors"))
    for key, value in stats.tensors().items():
        assert torch.equal(tensors[key], value), key


def test_save_analysis_with_logit_lens(tmp_path, tiny):
    model, tokenizer = tiny
    sae = SAE(64, 128, 4)
    stats = FeatureStats(128, AnalyzeConfig(**RAW, top_k=2))
    lens = logit_lens(sae, model, k=5)
    save_analysis(stats, tmp_path, tokenizer, {}, lens)
    data = json.loads((tmp_path / "analysis" / "features.json").read_text())
    vocab = token_strings(tokenizer)
    for f in (0, 77):
        feature = data["features"][f]
        assert [t for t, _ in feature["top_logits"]] == [vocab[i] for i in lens[1][f].tolist()]
        assert len(feature["bottom_logits"]) == 5
        assert feature["top_logits"][0][1] >= feature["bottom_logits"][0][1]
    assert load_file(str(tmp_path / "analysis" / "features.safetensors"))["top_logit_id"].shape == (128, 5)


def test_token_strings(tokenizer):
    vocab = token_strings(tokenizer)
    assert len(vocab) == 258 and vocab[0] == "<bos>" and vocab[1] == "<eos>"
    assert vocab[tokenizer("a", add_special_tokens=False)["input_ids"][0]] == "a"


def test_logit_lens_equals_brute_force():
    model = tiny_model(seed=1)
    with torch.no_grad():  # a final norm whose scale is not all ones, so that applying it matters
        model.model.norm.weight.uniform_(0.1, 3.0, generator=torch.Generator().manual_seed(0))
    sae = SAE(64, 40, 4, seed=1)
    top, top_id, bottom, bottom_id = logit_lens(sae, model, k=6, chunk=16)  # 40 rows: chunks 16, 16, 8
    with torch.no_grad():
        logits = (sae.W_dec * model.model.norm.weight) @ model.lm_head.weight.T  # [F, V]
    ref_top, ref_bottom = logits.topk(6, dim=1), logits.topk(6, dim=1, largest=False)
    torch.testing.assert_close(top, ref_top.values)
    torch.testing.assert_close(bottom, ref_bottom.values)
    assert torch.equal(top_id, ref_top.indices) and torch.equal(bottom_id, ref_bottom.indices)
    assert top.shape == (40, 6) and (top[:, -1] >= bottom[:, -1]).all()


def test_stats_on_the_tiny_model_point_back_into_the_text(tiny, sentences):
    model, tokenizer = tiny
    rows = [{"text": s} for s in sentences]
    sae = SAE(64, 32, 4)
    stats = FeatureStats(32, AnalyzeConfig(**RAW, top_k=4, window_before=4, window_after=2))
    contexts = packed_contexts(DataConfig(context_size=24), tokenizer, "test", 2, rows=rows)
    for x, batch, used in harvest.activations(model, "model.layers.2", contexts):
        stats.update(sae.encode(x), used, batch)
    live = stats.top_act > 0
    assert live.sum() > 20
    for f, j in live.nonzero().tolist():
        row, pos = stats.top_row[f, j].item(), stats.top_pos[f, j].item()
        assert row % 10 == 9  # held-out rows only
        token = tokenizer(rows[row]["text"], add_special_tokens=False)["input_ids"][pos]
        assert stats.window_ids[f, j, 4] == token


# --- band samples, histograms, nearest features -----------------------------------------------------------


@pytest.mark.parametrize("first_max", [8.0, 4.0], ids=["max-in-first-batch", "max-doubles-after-it"])
def test_band_samples_are_uniform(first_max):
    """F_ latents fire alike on every token, each drawing its own keys: F_ independent samples of each band.
    When the final max is seen in the first batch, or the max doubles (each new band the union of two old
    ones), every band holds min(n, its tokens) samples and picks each of its tokens about equally often: a
    chi-square over the tokens of each band, with a fixed seed."""
    F_, nb, n = 300, 4, 3
    cfg = AnalyzeConfig(**RAW, top_k=1, window_before=1, window_after=1, intervals=nb, per_interval=n)
    stats, g = FeatureStats(F_, cfg), torch.Generator().manual_seed(3)
    tokens = {}  # (row, pos) -> act
    for b in range(8):
        batch = make_batch(b, g)
        B = int(batch.mask.sum())
        top = first_max if b == 0 else 8.0
        # (0, top] on a grid of eighths: the band edges are exact
        act = torch.randint(1, int(8 * top) + 1, (B,), generator=g) / 8
        act[0] = top
        stats.update(Code(act[:, None].expand(B, F_), torch.arange(F_).expand(B, F_)), batch.mask, batch)
        rows, positions = batch.row[batch.mask].tolist(), batch.pos[batch.mask].tolist()
        tokens |= dict(zip(zip(rows, positions), act.tolist()))
    s = stats.tensors()
    assert (s["max_act"] == 8.0).all()
    for j in range(nb):
        in_band = [t for t, a in tokens.items() if 2 * j < a <= 2 * (j + 1)]
        c = len(in_band)
        assert c > 3 * n
        acts = s["interval_act"][:, j]  # [F_, n]
        assert ((acts > 2 * j) & (acts <= 2 * (j + 1))).all()  # every slot full, every act in the band
        picked = {t: 0 for t in in_band}
        rows, positions = s["interval_row"][:, j].flatten(), s["interval_pos"][:, j].flatten()
        for token in zip(rows.tolist(), positions.tolist()):
            picked[token] += 1
        assert len(picked) == c  # nothing from outside the band
        expected = F_ * n / c
        chi2 = sum((o - expected) ** 2 / expected for o in picked.values())
        assert chi2 < (c - 1) + 4 * (2 * (c - 1)) ** 0.5, (j, c, chi2)
        fine = stats.hist_counts[0]
        slack = sum(int(fine[fine_bin(stats, edge)]) for edge in (2 * j, 2 * j + 2) if 0 < edge < 8)
        assert abs(s["interval_count"][0, j] - c) <= slack
    assert (s["interval_count"] == s["interval_count"][0]).all()


def test_band_samples_of_a_feature_whose_max_keeps_growing():
    """A max that grows in every batch (the random-code stream's even latents): samples re-binned into the
    final bands still point at the right tokens, with the right windows, inside their bands."""
    g = torch.Generator().manual_seed(4)
    f_, cfg = (
        6,
        AnalyzeConfig(**RAW, top_k=2, window_before=BEFORE, window_after=AFTER, intervals=5, per_interval=2),
    )
    stats, stream = FeatureStats(f_, cfg), []
    for b in range(8):
        batch = make_batch(b, g)
        code, z = random_code(batch.mask, b, g, f_, 3)
        stats.update(code, batch.mask, batch)
        stream.append((z, batch))
    check_bands_against_reference(stats, stream, f_)
    assert (stats.interval_act > 0).sum() > 30


def test_state_does_not_grow_with_the_stream():
    g = torch.Generator().manual_seed(5)
    cfg = AnalyzeConfig(**RAW, top_k=3, window_before=2, window_after=1, intervals=4, per_interval=2)
    stats = FeatureStats(12, cfg)

    def shapes() -> dict:
        state = {k: v for k, v in vars(stats).items() if isinstance(v, torch.Tensor)} | stats.tensors()
        return {k: (v.shape, v.dtype) for k, v in state.items()}

    for b in range(12):
        batch = make_batch(b, g)
        code, _ = random_code(batch.mask, b, g, 12, 5)
        stats.update(code, batch.mask, batch)
        if b == 0:
            first = shapes()
    assert shapes() == first
    assert first["interval_window_ids"][0] == (12, 4, 2, 4) and first["hist_counts"][0] == (12, HIST_BINS)


def test_histogram_edges_and_out_of_range_acts():
    stats = FeatureStats(1, AnalyzeConfig(**RAW, top_k=1, window_before=0, window_after=0))
    edges = stats.hist_edges
    assert len(edges) == HIST_BINS + 1 and edges[0] == 0 and edges[-1] == 1e4
    torch.testing.assert_close(edges[2:] / edges[1:-1], torch.full((HIST_BINS - 1,), 10 ** (1 / 64)))
    ids = torch.full((1, 4), 9)
    row = torch.zeros(1, 4, dtype=torch.long)
    batch = Contexts(ids=ids, row=row, pos=torch.arange(4)[None], mask=ids > 1)
    # below the log range, in the first bin, on a decade's edge, above the range
    acts = torch.tensor([[1e-6], [5e-5], [1.0], [3e4]])
    stats.update(Code(acts, torch.zeros(4, 1, dtype=torch.long)), batch.mask, batch)
    counts = stats.hist_counts[0]
    assert counts[0] == 2 and counts[-1] == 1 and counts[fine_bin(stats, 1.0)] == 1 and counts.sum() == 4
    assert edges[fine_bin(stats, 1.0)] == 1.0  # 1 opens its bin: bins are [lo, hi)


def test_rebin_histogram_bounds_and_totals():
    """Equal-width bins of [0, max] from the fine histogram: the totals are exact, and each bin's count is
    within the counts of the fine bins its edges fall in of the true count."""
    g = torch.Generator().manual_seed(6)
    edges = FeatureStats(1, CFG).hist_edges
    values = [
        torch.rand(400, generator=g) ** 3 * 5,
        torch.rand(7, generator=g) * 1e-3,
        torch.tensor([2.5e4, 3.0]),
        torch.empty(0),
    ]
    fine = torch.stack(
        [torch.bincount(torch.bucketize(v, edges, right=True) - 1, minlength=HIST_BINS + 1) for v in values]
    )[:, :HIST_BINS]  # [4, H]; nothing at or above 1e4 but 2.5e4 (dropped)
    fine[2, -1] = 1  # which the analysis counts in the last bin
    top = torch.tensor([v.max().item() if len(v) else 0.0 for v in values])
    coarse = rebin_histogram(fine, edges, top, 20)
    assert coarse.shape == (4, 20) and coarse.dtype == torch.long
    assert coarse.sum(1).tolist() == [400, 7, 2, 0]
    assert coarse[2, 0] == 1  # 3.0 in (0, 1250]; 2.5e4 spread over the last fine bin, taken to reach the max
    for v, c, h, m in zip(values[:2], coarse, fine, top.tolist()):
        for j in range(20):
            lo, hi = m * j / 20, m * (j + 1) / 20
            true = int(((v > lo) & (v <= hi)).sum())
            at = [int(torch.bucketize(torch.tensor(x), edges, right=True)) - 1 for x in (lo, hi) if x < m]
            slack = sum(int(h[i]) for i in at)
            assert abs(c[j].item() - true) <= slack, (j, c[j], true, slack)


def test_nearest_features_equals_dense_reference():
    sae = SAE(64, 40, 4, seed=2)
    cos, ids = nearest_features(sae, n=5, chunk=16)  # 40 rows: chunks 16, 16, 8
    with torch.no_grad():
        W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        ref = W @ W.T  # [F, F]
    ref.fill_diagonal_(-float("inf"))
    top = ref.topk(5, dim=1)
    assert cos.shape == ids.shape == (40, 5)
    torch.testing.assert_close(cos, top.values)
    assert torch.equal(ids, top.indices)
    assert (ids != torch.arange(40)[:, None]).all() and (cos[:, :-1] >= cos[:, 1:]).all()
    assert nearest_features(SAE(64, 3, 2), n=8)[1].shape == (3, 2)  # at most every other feature


EXAMPLE_KEYS = {"act", "row", "pos", "tokens", "acts", "center"}


def test_save_analysis_schema(tmp_path, tokenizer):
    """features.json's per-feature intervals, histogram and nearest, and the tensors behind them."""
    g = torch.Generator().manual_seed(7)
    f_ = 12
    stats = FeatureStats(
        f_,
        AnalyzeConfig(**RAW, top_k=3, window_before=BEFORE, window_after=AFTER, intervals=5, per_interval=2),
    )
    for b in range(6):
        batch = make_batch(b, g)
        code, _ = random_code(batch.mask, b, g, f_, 5)
        stats.update(code, batch.mask, batch)
    nearest = nearest_features(SAE(64, f_, 4), n=4)
    save_analysis(stats, tmp_path, tokenizer, {"model": "tiny"}, nearest=nearest)
    data = json.loads((tmp_path / "analysis" / "features.json").read_text())
    assert data["intervals"] == 5 and data["window"] == [BEFORE, AFTER] and data["model"] == "tiny"
    s = stats.tensors()
    for f, feature in enumerate(data["features"]):
        keys = {"id", "density", "max_act", "mean_act", "examples", "intervals", "histogram", "nearest"}
        assert keys <= set(feature)
        count = int(stats.count[f])
        hist = feature["histogram"]
        assert len(hist["edges"]) == 21 and len(hist["counts"]) == 20 and sum(hist["counts"]) == count
        assert hist["edges"][0] == 0 and hist["edges"][-1] == feature["max_act"]
        intervals = feature["intervals"]
        assert [i["lo"] for i in intervals[1:]] == [i["hi"] for i in intervals[:-1]]
        assert intervals[0]["lo"] == 0 and intervals[-1]["hi"] == feature["max_act"]
        assert [i["count"] for i in intervals] == s["interval_count"][f].tolist()
        for j, interval in enumerate(intervals):
            assert len(interval["examples"]) == int((s["interval_act"][f, j] > 0).sum()) <= 2
            for e in interval["examples"]:
                assert set(e) == set(feature["examples"][0]) == EXAMPLE_KEYS
                assert interval["lo"] <= e["act"] <= interval["hi"] and len(e["tokens"]) == len(e["acts"])
                assert abs(e["acts"][e["center"]] - e["act"]) < 1e-3  # acts are rounded to 3 places, act to 4
        assert [i for i, _ in feature["nearest"]] == nearest[1][f].tolist()
        assert [c for _, c in feature["nearest"]] == [round(c, 3) for c in nearest[0][f].tolist()]
    assert sum(len(i["examples"]) for feature in data["features"] for i in feature["intervals"]) > 60
    tensors = load_file(str(tmp_path / "analysis" / "features.safetensors"))
    assert torch.equal(tensors["nearest_id"], nearest[1])
    assert tensors["interval_window_ids"].shape == (f_, 5, 2, BEFORE + 1 + AFTER)
    assert tensors["hist_counts"].shape == (f_, HIST_BINS) and tensors["hist_edges"].shape == (HIST_BINS + 1,)


@pytest.mark.parametrize("field", ["intervals", "per_interval", "nearest"])
def test_config_rejects_empty_bands_and_lists(field):
    with pytest.raises(ValueError, match=f"analyze.{field}=0 must be > 0"):
        AnalyzeConfig(**{field: 0})
