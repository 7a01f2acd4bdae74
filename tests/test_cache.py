"""The activation cache: what it stores, resuming, bad caches, shuffled reading, and the pipeline using it."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from sae import harvest
from sae import pipeline as pl
from sae.cache import ActivationCache, write_cache
from sae.config import DataConfig, ModelConfig, SAEConfig, TrainConfig, TrainJob, WandbConfig
from sae.data import packed_contexts
from sae.files import save_tensors, write_json
from sae.model import SAE

L1, L2 = "model.layers.1", "model.layers.2"
RATIO = 1.2  # drops ~7% of the tiny model's tokens, not the same ones at both layers


@pytest.fixture
def contexts(tokenizer, sentences):
    """A function returning a fresh stream of the 16 batches (3 x 32 tokens, 1460 text tokens) of the corpus."""
    rows = [{"text": s} for s in sentences]
    return lambda: packed_contexts(DataConfig(context_size=32), tokenizer, "train", 3, rows=rows)


def _write(path, model, contexts, modules=(L1,), max_tokens=10**6, shard_tokens=200, **provenance):
    return write_cache(path, model, list(modules), contexts, max_tokens, RATIO, provenance, shard_tokens)


def _shard(cache: ActivationCache, i: int):
    from safetensors import safe_open

    return safe_open(str(cache.dir / cache.meta["shards"][i]["file"]), framework="pt")


def _forwards(model):
    """A list that grows by one per model forward, and the hook's handle."""
    calls: list[int] = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def _assert_same(a: ActivationCache, b: ActivationCache) -> None:
    assert a.meta == b.meta
    for m in a.modules:
        assert torch.equal(a.load(m), b.load(m))
    for key, value in a.provenance().items():
        assert torch.equal(value, b.provenance()[key])


# --- writing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_holds_what_harvest_yields_with_provenance(tmp_path, tiny, contexts, dtype):
    model = tiny[0]
    if dtype == "bfloat16":
        model = harvest.load_model(ModelConfig(name="tiny", dtype=dtype, device="cpu"))[0]
    cache = _write(tmp_path / "cache", model, contexts())
    xs, ids, rows, pos = [], [], [], []
    for x, batch, used in harvest.activations(model, L1, contexts(), max_norm_ratio=RATIO):
        xs.append(x)
        ids.append(batch.ids[used])
        rows.append(batch.row[used])
        pos.append(batch.pos[used])
    with _shard(cache, 0) as f:
        assert f.get_tensor(f"acts.{L1}").dtype == getattr(torch, dtype)  # the model's own dtype, lossless
    assert cache.meta["dtype"] == dtype and cache.meta["provenance"]["model_dtype"] == dtype
    assert torch.equal(cache.load(L1), torch.cat(xs))
    prov = cache.provenance()
    assert torch.equal(prov["token_id"], torch.cat(ids).int())
    assert torch.equal(prov["row"], torch.cat(rows)) and torch.equal(prov["pos"], torch.cat(pos).int())
    assert cache.tokens == len(prov["row"]) < 1460 and cache.meta["d_in"] == {L1: 64}


def test_several_modules_keep_the_same_tokens(tmp_path, tiny, contexts):
    """A token is cached if every module keeps it, so the modules' rows and the provenance line up."""
    model = tiny[0]
    cache = _write(tmp_path / "cache", model, contexts(), modules=(L1, L2))
    single = {m: list(harvest.activations(model, m, contexts(), max_norm_ratio=RATIO)) for m in (L1, L2)}
    expected: dict[str, list[torch.Tensor]] = {L1: [], L2: [], "row": []}
    differ = False
    for (_, batch, used1), (_, _, used2) in zip(single[L1], single[L2]):
        both = used1 & used2
        differ |= not torch.equal(used1, used2)
        acts = harvest.capture(model, [L1, L2], batch.ids)
        for m in (L1, L2):
            expected[m].append(acts[m][both])
        expected["row"].append(batch.row[both])
    assert differ  # else this test would not tell AND from either module's own mask
    for m in (L1, L2):
        assert torch.equal(cache.load(m), torch.cat(expected[m]))
    assert torch.equal(cache.provenance()["row"], torch.cat(expected["row"]))


def test_the_in_memory_and_the_cache_harvest_keep_the_same_tokens(tmp_path, tiny, contexts):
    """One keep rule for every harvest: several modules harvested in memory hold exactly the cached rows."""
    model = tiny[0]
    cache = _write(tmp_path / "cache", model, contexts(), modules=(L1, L2))
    in_memory = harvest.harvest_tensors(model, [L1, L2], contexts(), 10**6, RATIO)
    alone = harvest.harvest_tensors(model, [L1], contexts(), 10**6, RATIO)[L1]
    assert len(alone) != len(in_memory[L1])  # the modules' own masks differ: the rule is seen at work
    for m in (L1, L2):
        assert torch.equal(in_memory[m], cache.load(m))
    capped = harvest.harvest_tensors(model, [L1, L2], contexts(), 300, RATIO)
    assert all(torch.equal(capped[m], cache.load(m)[:300]) for m in (L1, L2))


def test_shards_are_listed_atomic_and_end_after_whole_batches(tmp_path, tiny, contexts):
    cache = _write(tmp_path / "cache", tiny[0], contexts())
    shards = cache.meta["shards"]
    assert len(shards) >= 5 and cache.meta["complete"]
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(
        [".lock", "meta.json"] + [s["file"] for s in shards]
    )
    assert all(s["tokens"] >= 200 for s in shards[:-1]) and sum(s["tokens"] for s in shards) == cache.tokens
    batches = [s["batches"] for s in shards]
    assert batches == sorted(set(batches)) and batches[-1] == cache.meta["batches"] == 16


def test_max_tokens_cuts_the_harvest_exactly(tmp_path, tiny, contexts):
    full = _write(tmp_path / "full", tiny[0], contexts())
    cut = _write(tmp_path / "cut", tiny[0], contexts(), max_tokens=500)
    assert cut.tokens == 500 and cut.meta["batches"] < 16
    assert torch.equal(cut.load(L1), full.load(L1)[:500])
    assert torch.equal(cut.provenance()["pos"], full.provenance()["pos"][:500])


def _interrupted(contexts, after: int):
    for i, batch in enumerate(contexts):
        if i == after:
            raise KeyboardInterrupt
        yield batch


def test_an_interrupted_harvest_resumes_to_the_same_cache_without_rerunning_the_model(
    tmp_path, tiny, contexts
):
    model = tiny[0]
    reference = _write(tmp_path / "reference", model, contexts(), modules=(L1, L2))
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "cache", model, _interrupted(contexts(), 8), modules=(L1, L2))
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert not meta["complete"] and meta["shards"] and 0 < meta["batches"] < 8  # the last batches were lost
    with pytest.raises(ValueError, match="interrupted.*resume"):
        ActivationCache(tmp_path / "cache")

    calls, handle = _forwards(model)
    try:
        resumed = _write(tmp_path / "cache", model, contexts(), modules=(L1, L2))
    finally:
        handle.remove()
    assert len(calls) == 16 - meta["batches"]  # the batches already in shards are skipped, not rerun
    _assert_same(resumed, reference)
    for s in reference.meta["shards"]:
        assert (resumed.dir / s["file"]).read_bytes() == (reference.dir / s["file"]).read_bytes()


def test_a_complete_cache_is_reused_without_running_the_model(tmp_path, tiny, contexts):
    model = tiny[0]
    first = _write(tmp_path / "cache", model, contexts(), data={"context_size": 32})
    calls, handle = _forwards(model)
    try:
        again = _write(tmp_path / "cache", model, contexts(), data={"context_size": 32})
    finally:
        handle.remove()
    assert calls == []
    _assert_same(first, again)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"data": {"context_size": 64}}, "data.context_size"),
        ({"modules": (L2,), "data": {"context_size": 32}}, "modules"),
    ],
)
def test_a_cache_of_other_settings_is_refused_by_name(tmp_path, tiny, contexts, changes, key):
    _write(tmp_path / "cache", tiny[0], contexts(), data={"context_size": 32})
    with pytest.raises(ValueError, match="other settings") as info:
        _write(tmp_path / "cache", tiny[0], contexts(), **changes)
    assert key in str(info.value) and str(tmp_path / "cache") in str(info.value)


def test_a_directory_that_is_not_a_cache_is_refused(tmp_path, tiny, contexts):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an activation cache"):
        _write(tmp_path / "cache", tiny[0], contexts())
    assert (tmp_path / "cache" / "notes.txt").read_text() == "mine"


def test_a_missing_or_truncated_shard_is_named(tmp_path, tiny, contexts):
    cache = _write(tmp_path / "cache", tiny[0], contexts())
    shard = cache.dir / cache.meta["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt") as info:
        ActivationCache(cache.dir)
    assert str(shard) in str(info.value)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing") as info:
        ActivationCache(cache.dir)
    assert str(shard) in str(info.value)


# --- reading --------------------------------------------------------------------------------------------


def _numbered(path: Path, shards: int = 10, n: int = 96) -> ActivationCache:
    """A cache whose token i has activation [i, -i] in the module `m`: each row names its token."""
    listed = []
    for s in range(shards):
        i = torch.arange(s * n, (s + 1) * n)
        name = f"shard-{s:05d}.safetensors"
        save_tensors(
            path / name,
            {"acts.m": torch.stack([i, -i], 1).float(), "token_id": i.int(), "row": i, "pos": i.int()},
        )
        listed.append({"file": name, "tokens": n, "batches": s + 1})
    write_json(
        path / "meta.json",
        {
            "provenance": {"modules": ["m"]},
            "dtype": "float32",
            "d_in": {"m": 2},
            "shard_tokens": n,
            "shards": listed,
            "batches": shards,
            "tokens": shards * n,
            "complete": True,
        },
    )
    return ActivationCache(path)


def test_batches_serve_every_token_once_per_pass(tmp_path, gen):
    cache = _numbered(tmp_path)  # 960 tokens
    batches = list(cache.batches("m", 64, 3 * 960, gen, buffer_tokens=200))
    assert len(batches) == 45 and all(b.shape == (64, 2) and b.dtype == torch.float32 for b in batches)
    for p in range(3):
        served = torch.cat(batches[p * 15 : (p + 1) * 15])[:, 0]
        assert torch.equal(served.sort().values, torch.arange(960.0))
    assert torch.equal(torch.cat(batches)[:, 1], -torch.cat(batches)[:, 0])


def test_batches_mix_shards_from_a_bounded_buffer(tmp_path, gen, monkeypatch):
    cache = _numbered(tmp_path)
    reads: list[int] = []
    read = cache._read
    monkeypatch.setattr(cache, "_read", lambda i, key: reads.append(i) or read(i, key))
    stream = cache.batches("m", 64, 960, gen, buffer_tokens=200)
    first = next(stream)
    assert len(reads) == 3  # a 200-token buffer of 96-token shards: three shards read, not the cache
    assert len(set(first[:, 0].div(96, rounding_mode="floor").tolist())) >= 2
    list(stream)
    assert sorted(reads) == list(range(10)) and reads != sorted(reads)  # each once, in a random order


def test_batches_are_deterministic_given_the_generator(tmp_path):
    cache = _numbered(tmp_path)

    def run(seed):
        return torch.cat(list(cache.batches("m", 64, 2000, torch.Generator().manual_seed(seed), 200)))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    with pytest.raises(ValueError, match="'x' is not in activation cache"):
        cache.load("x")


# --- the pipeline ---------------------------------------------------------------------------------------


def _job(tmp_path: Path, corpus: Path, run: str, **train) -> TrainJob:
    train = {
        "tokens": 2048,
        "harvest_tokens": 2048,
        "batch_size": 256,
        "buffer_tokens": 1024,
        "cache_dir": str(tmp_path / "cache"),
    } | train
    return TrainJob(
        model=ModelConfig(name="tiny", dtype="float32", layer=1, batch_size=4),
        data=DataConfig(path=str(corpus), context_size=64),
        sae=SAEConfig(k=8, expansion_factor=2),
        train=TrainConfig(**train),
        wandb=WandbConfig(mode="disabled"),
        run_dir=str(tmp_path / run),
        do_analyze=False,
    )


def _count_harvest_forwards(monkeypatch) -> list[int]:
    """Counts model forwards made while the pipeline fills the cache."""
    calls: list[int] = []
    harvesting = [False]
    capture, write = harvest.capture, pl.write_cache

    def counted_capture(*args, **kwargs):
        if harvesting[0]:
            calls.append(1)
        return capture(*args, **kwargs)

    def flagged_write(*args, **kwargs):
        harvesting[0] = True
        try:
            return write(*args, **kwargs)
        finally:
            harvesting[0] = False

    monkeypatch.setattr(harvest, "capture", counted_capture)
    monkeypatch.setattr(pl, "write_cache", flagged_write)
    return calls


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(SAE.load(run_dir).state_dict())


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_reuses_the_cache_and_trains_the_same_sae(tmp_path, corpus, monkeypatch, capsys, in_memory):
    calls = _count_harvest_forwards(monkeypatch)
    first = pl.run_training(_job(tmp_path, corpus, "first", in_memory=in_memory))
    assert len(calls) > 1
    shards = sorted((tmp_path / "cache").glob("shard-*"))
    mtimes = [p.stat().st_mtime_ns for p in [*shards, tmp_path / "cache" / "meta.json"]]
    calls.clear()
    second = pl.run_training(_job(tmp_path, corpus, "second", in_memory=in_memory))
    assert calls == []
    assert [p.stat().st_mtime_ns for p in [*shards, tmp_path / "cache" / "meta.json"]] == mtimes
    for key, value in _weights(tmp_path / "first").items():
        assert torch.equal(value, _weights(tmp_path / "second")[key]), key
    assert second["fvu"] == first["fvu"] and second["l0"] == pytest.approx(8, abs=0.01)
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert metrics["peak_rss_gb"] >= metrics["peak_rss_gb_harvest_train"] > 0.1
    assert "peak memory of harvest + training: host " in capsys.readouterr().out
    if in_memory:  # one module: the cache holds exactly what the in-memory harvest holds
        pl.run_training(_job(tmp_path, corpus, "uncached", in_memory=True, cache_dir=None))
        for key, value in _weights(tmp_path / "first").items():
            assert torch.equal(value, _weights(tmp_path / "uncached")[key]), key


def test_several_saes_stream_from_one_cache_of_two_hooks(tmp_path, corpus):
    job = _job(tmp_path, corpus, "run", in_memory=False)
    job.saes = [{"hook": "resid.1"}, {"hook": "resid.2"}]
    results = pl.run_training(job)
    assert set(results) == {"topk-k8-x2-resid.1", "topk-k8-x2-resid.2"}
    assert ActivationCache(tmp_path / "cache").modules == [L1, L2]


def test_training_refuses_a_cache_of_other_data_before_writing_a_run(tmp_path, corpus):
    pl.run_training(_job(tmp_path, corpus, "run", harvest_tokens=512, tokens=512))
    job = _job(tmp_path, corpus, "other", harvest_tokens=512, tokens=512)
    job.data.context_size = 32
    with pytest.raises(ValueError, match="data.context_size: 64 in the cache, 32 now"):
        pl.run_training(job)
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.tmp").exists()


def test_streaming_without_a_cache_evaluates_while_the_next_batches_are_harvested(tmp_path, corpus):
    """The harvest runs ahead in a background thread; the in-training evaluation takes turns with it."""
    job = _job(tmp_path, corpus, "run", in_memory=False, cache_dir=None, eval_every=2, log_every=2)
    job.eval.train_loss_contexts, job.eval.loss_contexts = 2, 0
    metrics = pl.run_training(job)
    assert metrics["l0"] == pytest.approx(8, abs=0.01) and metrics["peak_rss_gb"] > 0.1


@pytest.mark.parametrize("world", [2, 3, 16])
def test_data_parallel_ranks_serve_disjoint_shares_that_cover_the_cache(tmp_path, world):
    cache = _numbered(tmp_path)  # 10 shards of 96 tokens; 16 ranks split tokens within shards instead
    shares = []
    for rank in range(world):
        stream = cache.batches("m", 16, 10**9, torch.Generator().manual_seed(rank), 200, shard=(rank, world))
        rows = 96 if world <= 10 else len(range(96)[rank::world])  # tokens it reads of each of its shards
        per_pass = len(stream.shards) * rows // 16
        shares.append({int(t) for b in itertools.islice(stream, per_pass) for t in b[:, 0]})
    assert all(not (a & b) for i, a in enumerate(shares) for b in shares[i + 1 :])
    assert sum(len(s) for s in shares) > 960 - 16 * world  # all but each rank's last partial batch
