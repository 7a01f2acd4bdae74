"""Hooking a module by name, stopping the forward early, and the activation streams.

Capture and harvest run the tiny model on the device under test (`tiny_on_device`, `$SAE_TEST_DEVICE`);
naming modules and the host-side streams (shuffle buffer, epochs, prefetch) run on the CPU."""

import itertools
import math
import threading
import time

import pytest
import torch

from sae import devices, harvest, stream
from sae.config import DataConfig, ModelConfig
from sae.data import packed_contexts


def resolve(model, **kw) -> str:
    return harvest.resolve_module(model, ModelConfig(name="tiny", **kw))


@pytest.fixture(scope="module")
def batch(tiny, sentences):
    _, tokenizer = tiny
    rows = [{"text": s} for s in sentences]
    return next(packed_contexts(DataConfig(context_size=32), tokenizer, "train", 3, rows=rows))


def test_load_model_tiny(tiny_on_device, device):
    model, tokenizer = tiny_on_device
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.device == device
    assert len(tokenizer) == model.config.vocab_size == 258


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_capture_equals_hidden_states(tiny_on_device, batch, layer):
    model, _ = tiny_on_device
    name = resolve(model, layer=layer)
    acts = harvest.capture(model, [name], batch.ids)[name]
    assert acts.shape == (3, 32, 64) and acts.dtype == torch.float32
    reference = model(batch.ids.to(model.device), output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(acts, reference)


def test_capture_stops_after_the_hooked_block(tiny_on_device, batch):
    model, _ = tiny_on_device
    name = resolve(model, layer=1)
    calls = []
    later = {"block 2": model.model.layers[2], "final norm": model.model.norm, "lm_head": model.lm_head}
    handles = [m.register_forward_pre_hook(lambda *_, w=w: calls.append(w)) for w, m in later.items()]
    try:
        harvest.capture(model, [name], batch.ids)
        assert calls == []
        model(batch.ids.to(model.device))  # the hooks do fire on a full forward pass
        assert calls == list(later)
    finally:
        for h in handles:
            h.remove()


def test_capture_removes_its_hooks(tiny_on_device, batch):
    model, _ = tiny_on_device
    name = resolve(model, layer=2)
    module = model.get_submodule(name)
    before = len(module._forward_hooks)
    harvest.capture(model, [name], batch.ids)
    assert len(module._forward_hooks) == before


def test_capture_several_modules(tiny_on_device, batch):
    model, _ = tiny_on_device
    names = [resolve(model, layer=0), "model.layers.2.mlp", resolve(model, layer=2)]
    out = harvest.capture(model, names, batch.ids)
    assert set(out) == set(names)
    hidden = model(batch.ids.to(model.device), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["model.layers.0"], hidden[1])
    torch.testing.assert_close(out["model.layers.2"], hidden[3])
    assert out["model.layers.2.mlp"].shape == (3, 32, 64)


def test_resolve_module_alias_layer_and_exact_path(tiny):
    model, _ = tiny
    assert resolve(model, module="resid.1") == "model.layers.1"
    assert resolve(model, layer=3) == "model.layers.3"
    assert resolve(model, module="model.layers.1.mlp") == "model.layers.1.mlp"
    assert resolve(model, layer=0, module="model.layers.2") == "model.layers.2"  # module wins over layer
    assert harvest.blocks(model) == ("model.layers", model.model.layers)


def test_resolve_module_unknown_name_suggests_close_names(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"'model\.layer\.1'.*close names.*'model\.layers\.1'") as err:
        resolve(model, module="model.layer.1")
    assert "resid.0 .. resid.3" in str(err.value)


@pytest.mark.parametrize(
    "kw, given", [({"layer": 4}, "4"), ({"module": "resid.7"}, "resid.7"), ({"module": "resid.x"}, "x")]
)
def test_resolve_module_layer_out_of_range(tiny, kw, given):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"4 blocks") as err:
        resolve(model, **kw)
    assert given in str(err.value) and "0..3" in str(err.value)


def test_activations_drop_masked_positions(tiny_on_device, sentences):
    model, tokenizer = tiny_on_device
    name = resolve(model, layer=2)
    rows = [{"text": s} for s in sentences]
    contexts = list(packed_contexts(DataConfig(context_size=16), tokenizer, "train", 2, rows=rows))
    out = list(harvest.activations(model, name, contexts))
    assert len(out) == len(contexts)
    for (x, b, used), c in zip(out, contexts):
        assert b is c
        assert x.dtype == torch.float32 and x.shape == (int(c.mask.sum()), 64)
        assert torch.equal(used, c.mask)
        assert (~c.mask).any()  # there were positions to drop
        assert x.device == model.device
        torch.testing.assert_close(x, harvest.capture(model, [name], c.ids)[name][c.mask.to(model.device)])


def test_activations_stop_after_max_tokens(tiny_on_device, sentences):
    model, tokenizer = tiny_on_device
    rows = [{"text": s} for s in sentences]
    contexts = list(packed_contexts(DataConfig(context_size=16), tokenizer, "train", 2, rows=rows))
    per_batch = [int(c.mask.sum()) for c in contexts]
    out = list(harvest.activations(model, "model.layers.1", contexts, max_tokens=per_batch[0] + 1))
    assert [len(x) for x, _, _ in out] == per_batch[:2]


def test_keep_rows_drops_massive_activations(device):
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0)).to(device)
    x[[3, 50]] *= 1000
    keep = harvest.keep_rows(x, 10.0)
    assert keep.sum() == 98 and not keep[3] and not keep[50]
    assert harvest.keep_rows(x, 0.0).all()
    assert harvest.keep_rows(x[:0], 10.0).shape == (0,)


def test_activations_skip_outliers_and_mark_them_unused(tiny_on_device, batch):
    model, _ = tiny_on_device
    name = "model.layers.1"
    full = harvest.capture(model, [name], batch.ids)[name][batch.mask.to(model.device)]
    ratio = full.norm(dim=1).median().item()
    # A ratio just under the largest norm's multiple of the median drops at least that token.
    limit = full.norm(dim=1).max().item() / ratio * 0.999
    x, _, used = next(harvest.activations(model, name, [batch], max_norm_ratio=limit))
    assert 0 < len(x) < len(full)
    assert int(used.sum()) == len(x)
    assert (used <= batch.mask).all()
    acts = harvest.capture(model, [name], batch.ids)[name]
    torch.testing.assert_close(x, acts[used.to(model.device)])


def numbered(n: int, d: int = 3) -> torch.Tensor:
    """Rows whose first column is their index, so a batch says where its tokens came from."""
    return torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)


def test_shuffled_is_a_permutation_in_full_batches(gen):
    x = numbered(203)
    chunks = list(x.split(17))
    out = list(stream.shuffled(iter(chunks), capacity=60, batch_size=8, generator=gen))
    assert all(b.shape == (8, 3) for b in out)
    ids = torch.cat(out)[:, 0].long()
    assert len(ids) == 203 - 203 % 8
    assert len(set(ids.tolist())) == len(ids)  # no token twice
    assert set(ids.tolist()) <= set(range(203))
    assert not torch.equal(ids, ids.sort().values)  # the order did change
    assert not any((b[:, 0].diff() == 1).all() for b in out)  # including in batches from the first fill
    # Batches mix tokens from different input chunks.
    assert any(len({i // 17 for i in b[:, 0].long().tolist()}) > 1 for b in out)


def test_shuffled_small_stream_and_empty_stream(gen):
    out = list(stream.shuffled(iter([numbered(20)]), capacity=1000, batch_size=8, generator=gen))
    assert [len(b) for b in out] == [8, 8]
    assert list(stream.shuffled(iter([]), capacity=10, batch_size=4, generator=gen)) == []


def test_shuffled_is_reproducible_with_a_seed():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat(list(stream.shuffled(iter(numbered(100).split(10)), 30, 5, g)))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("tokens", [64, 200, 250])
def test_epochs_serves_the_requested_tokens(gen, tokens):
    x = numbered(100).to(torch.float16)
    out = list(stream.epochs(x, batch_size=16, tokens=tokens, generator=gen))
    assert all(b.shape == (16, 3) and b.dtype == torch.float32 for b in out)
    assert len(out) == math.ceil(tokens / 16)
    # Within a pass (100 // 16 = 6 batches) no token repeats; passes reshuffle.
    first_pass = torch.cat(out[:6])[:, 0].long().tolist()
    assert len(set(first_pass)) == len(first_pass)
    if len(out) > 6:
        assert out[6][:, 0].tolist() != out[0][:, 0].tolist()


def test_epochs_raises_with_fewer_tokens_than_a_batch(gen):
    with pytest.raises(ValueError, match="only 10 tokens.*train.batch_size=16"):
        next(stream.epochs(numbered(10), batch_size=16, tokens=100, generator=gen))


def test_resolve_dtype_and_device(device):
    cpu = torch.device("cpu")
    assert devices.resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    assert devices.resolve_dtype("auto", device) in (torch.bfloat16, torch.float32)
    assert devices.resolve_dtype("float16", cpu) == torch.float16
    assert devices.resolve_dtype("float32", cpu) == torch.float32
    assert devices.resolve_device("cpu") == cpu
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve_device("auto").type == expected


def test_harvest_modules_gives_each_module_what_a_single_hook_harvest_gives(tiny_on_device, sentences):
    model, tokenizer = tiny_on_device
    rows = [{"text": s} for s in sentences]

    def contexts():
        return packed_contexts(DataConfig(context_size=32), tokenizer, "train", 4, rows=rows)

    both = harvest.harvest_tensors(model, ["model.layers.1", "model.layers.3"], contexts(), 10**6, 0.0)
    for name in ("model.layers.1", "model.layers.3"):
        alone = harvest.harvest_tensors(model, [name], contexts(), 10**6, 0.0)[name]
        torch.testing.assert_close(both[name], alone)
    # Capped at max_tokens, from the same forward passes for every module.
    capped = harvest.harvest_tensors(model, ["model.layers.1", "model.layers.3"], contexts(), 50, 0.0)
    assert [len(x) for x in capped.values()] == [50, 50]


def test_prefetch_yields_everything_in_order_and_runs_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    ahead = stream.prefetch(items(), depth=2)
    assert next(ahead) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 4 and time.monotonic() < deadline:  # 1 taken + 2 queued + 1 waiting to be queued
        time.sleep(0.01)
    assert produced == [0, 1, 2, 3]  # made while the consumer did nothing, and no further than depth allows
    assert list(ahead) == [1, 2, 3, 4, 5]


def test_prefetch_raises_the_producers_error():
    def items():
        yield 1
        raise KeyError("bad row")

    ahead = stream.prefetch(items())
    assert next(ahead) == 1
    with pytest.raises(KeyError, match="bad row"):
        next(ahead)


def test_closing_prefetch_stops_the_producer():
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    ahead = stream.prefetch(endless(), depth=3)
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    ahead.close()  # joins the producer thread
    n = len(produced)
    time.sleep(0.05)
    assert len(produced) == n <= 5 + 3 + 1
    assert not any(t.name == "prefetch" for t in threading.enumerate())


def test_a_prefetch_dropped_without_close_stops_its_producer():
    ahead = stream.prefetch(itertools.count(), depth=2)
    assert next(ahead) == 0
    thread = ahead._thread
    del ahead  # garbage: its producer must not run on forever
    assert thread is not None
    thread.join(timeout=5)
    assert not thread.is_alive()
