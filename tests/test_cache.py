"""The activation cache: what it stores, the whole-batch budget, resuming, bad caches, replay of the cached
context batches, two gloo processes harvesting one cache, shuffled reading, and the pipeline using it."""

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import handmade_cache

from sae import harvest
from sae import pipeline as pl
from sae.cache import ActivationCache, write_cache
from sae.config import DataConfig, ModelConfig, SAEConfig, TrainConfig, TrainJob, WandbConfig
from sae.data import packed_contexts
from sae.files import write_json
from sae.model import SAE

L1, L2 = "model.layers.1", "model.layers.2"
RATIO = 1.2  # drops ~7% of the tiny model's tokens, not the same ones at both layers


def _stream(tokenizer, sentences):
    rows = [{"text": s} for s in sentences]
    return packed_contexts(DataConfig(context_size=32), tokenizer, "train", 3, rows=rows)


@pytest.fixture
def contexts(tokenizer, sentences):
    """A function returning a fresh stream of the 16 batches (3 x 32 tokens, 1460 text tokens) of the corpus."""
    return lambda: _stream(tokenizer, sentences)


def _write(
    path, model, contexts, modules=(L1,), max_tokens=10**6, shard_tokens=200, rank=0, world=1, **provenance
):
    return write_cache(
        path, model, list(modules), contexts, max_tokens, RATIO, provenance, shard_tokens, rank, world
    )


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
    assert all(sum(s["batch_tokens"]) == s["tokens"] for s in shards)
    assert [b for s in shards for b in s["batches"]] == list(range(16)) and cache.n_batches == 16
    assert [s["file"] for s in shards] == [f"shard-{s['batches'][0]:08d}.safetensors" for s in shards]


def test_max_tokens_keeps_whole_batches_up_to_the_one_that_reaches_it(tmp_path, tiny, contexts):
    full = _write(tmp_path / "full", tiny[0], contexts())
    cut = _write(tmp_path / "cut", tiny[0], contexts(), max_tokens=500)
    counts = [n for s in full.meta["shards"] for n in s["batch_tokens"]]
    n = cut.n_batches
    assert sum(counts[: n - 1]) < 500 <= sum(counts[:n]) == cut.tokens and n < 16
    assert torch.equal(cut.load(L1), full.load(L1)[: cut.tokens])
    assert torch.equal(cut.provenance()["pos"], full.provenance()["pos"][: cut.tokens])
    *_, (last, _, _, used) = cut.replay(L1)
    assert last == n - 1 and torch.equal(used, list(full.replay(L1))[n - 1][3])  # the last batch is whole


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
    assert not json.loads((tmp_path / "cache" / "meta.json").read_text())["complete"]
    # The shards listed so far are in the harvesting rank's own list until the harvest ends.
    progress = json.loads((tmp_path / "cache" / "progress-rank0.json").read_text())
    cached = sum(len(s["batches"]) for s in progress["shards"])
    assert 0 < cached < 8  # the last batches were lost
    with pytest.raises(ValueError, match="interrupted.*resume"):
        ActivationCache(tmp_path / "cache")

    calls, handle = _forwards(model)
    try:
        resumed = _write(tmp_path / "cache", model, contexts(), modules=(L1, L2))
    finally:
        handle.remove()
    assert len(calls) == 16 - cached  # the batches already in shards are skipped, not rerun
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


def test_a_cache_of_the_former_layout_is_refused_by_name(tmp_path, tiny, contexts):
    cache = _write(tmp_path / "cache", tiny[0], contexts())
    del cache.meta["provenance"]["cache_format"]  # as the former layout wrote it
    write_json(cache.dir / "meta.json", cache.meta)
    with pytest.raises(ValueError, match="other settings.*cache_format: None in the cache, 2 now"):
        _write(tmp_path / "cache", tiny[0], contexts())
    with pytest.raises(ValueError, match="has format None, not the format 2"):
        ActivationCache(cache.dir)


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


# --- replay and parallel harvest ------------------------------------------------------------------------


def _assert_replayed(replayed, expected) -> None:
    """The (index, x, contexts, used) of `ActivationCache.replay` equal the (x, contexts, used) expected."""
    assert len(replayed) == len(expected)
    for (_, x, batch, used), (x1, batch1, used1) in zip(replayed, expected):
        assert torch.equal(x, x1) and x.dtype == x1.dtype == torch.float32
        for field in ("ids", "row", "pos", "mask"):
            a, b = getattr(batch, field), getattr(batch1, field)
            assert torch.equal(a, b) and a.dtype == b.dtype, field
        assert torch.equal(used, used1) and used.dtype == torch.bool


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_yields_what_harvest_yields_without_running_the_model(tmp_path, tiny, contexts, dtype):
    model = tiny[0]
    if dtype == "bfloat16":
        model = harvest.load_model(ModelConfig(name="tiny", dtype=dtype, device="cpu"))[0]
    cache = _write(tmp_path / "cache", model, contexts())
    expected = list(harvest.activations(model, L1, contexts(), None, RATIO))
    calls, handle = _forwards(model)
    try:
        replayed = list(cache.replay(L1))
    finally:
        handle.remove()
    assert calls == [] and cache.n_batches == 16 and [b for b, *_ in replayed] == list(range(16))
    _assert_replayed(replayed, expected)
    assert (
        sum(int((batch.mask & ~used).sum()) for _, batch, used in expected) > 0
    )  # max_norm_ratio dropped some
    third = list(cache.replay(L1, rank=1, world=3))
    assert [b for b, *_ in third] == [1, 4, 7, 10, 13]
    _assert_replayed(third, expected[1::3])
    with pytest.raises(ValueError, match="rank=3 with world=3; accepted: 0 <= rank < world"):
        next(cache.replay(L1, rank=3, world=3))


WORLD = 2


def _harvest_rank(rank: int, store: str, root: str, sentences: list[str], cut: int) -> None:
    """One of two gloo processes: harvests a whole cache, one cut by `cut` tokens, one interrupted before
    batch 8 and then resumed, and resumes the 1-process harvest interrupted in `root/mixed`; records how
    many batches were cached before each resume and how many forwards it ran. Then is refused a cache of
    other settings."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, tokenizer = harvest.load_model(ModelConfig(name="tiny", dtype="float32", device="cpu"))
        out = Path(root)
        _write(out / "full", model, _stream(tokenizer, sentences), rank=rank, world=WORLD)
        _write(out / "cut", model, _stream(tokenizer, sentences), max_tokens=cut, rank=rank, world=WORLD)
        try:  # both ranks stop in the same round: rank 0 before batch 8, rank 1 on its way to batch 9
            stopped = _interrupted(_stream(tokenizer, sentences), 8)
            _write(out / "resumed", model, stopped, rank=rank, world=WORLD)
            raise AssertionError("the harvest was not interrupted")
        except KeyboardInterrupt:
            pass
        dist.barrier()  # both ranks' last shards are listed
        for name in ("resumed", "mixed"):
            listed = [json.loads(p.read_text()) for p in (out / name).glob("progress-rank*.json")]
            cached = sum(len(s["batches"]) for p in listed for s in p["shards"])
            dist.barrier()  # read before either rank resumes
            calls, handle = _forwards(model)
            try:
                _write(out / name, model, _stream(tokenizer, sentences), rank=rank, world=WORLD)
            finally:
                handle.remove()
            write_json(out / f"{name}-rank{rank}.json", {"cached": cached, "forwards": len(calls)})
        try:  # rank 0 finds the settings differ; every rank raises it, none waits in a collective
            _write(out / "full", model, _stream(tokenizer, sentences), modules=(L2,), rank=rank, world=WORLD)
            raise AssertionError("a cache of other settings was not refused")
        except ValueError as err:
            assert "other settings" in str(err), err
    finally:
        dist.destroy_process_group()


def _assert_equivalent(one: ActivationCache, two: ActivationCache) -> None:
    """The caches hold the same batches, tokens and contexts in the same order, however they are sharded."""
    assert {k: v for k, v in one.meta.items() if k != "shards"} == {
        k: v for k, v in two.meta.items() if k != "shards"
    }
    for m in one.modules:
        assert torch.equal(one.load(m), two.load(m))
        _assert_replayed(list(two.replay(m)), [r[1:] for r in one.replay(m)])
    for key, value in one.provenance().items():
        assert torch.equal(value, two.provenance()[key]), key


def test_two_gloo_processes_harvest_the_cache_one_process_harvests(tmp_path, tiny, contexts, sentences):
    model = tiny[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks, so the forwards sum in the same order
    try:
        full = _write(tmp_path / "full", model, contexts())
        counts = [n for s in full.meta["shards"] for n in s["batch_tokens"]]
        cut = sum(counts[:4]) + 1  # reached by batch 4, rank 0's of round 2: rank 1 drops its batch 5
        one_cut = _write(tmp_path / "cut", model, contexts(), max_tokens=cut)
        with pytest.raises(KeyboardInterrupt):
            _write(tmp_path / "two" / "mixed", model, _interrupted(contexts(), 8))
    finally:
        torch.set_num_threads(threads)
    args = (str(tmp_path / "store"), str(tmp_path / "two"), sentences, cut)
    mp.start_processes(_harvest_rank, args=args, nprocs=WORLD, start_method="spawn")

    assert one_cut.n_batches == 5 and one_cut.tokens >= cut
    for name, one in (("full", full), ("cut", one_cut), ("resumed", full), ("mixed", full)):
        two = ActivationCache(tmp_path / "two" / name)
        _assert_equivalent(one, two)
        assert sorted(p.name for p in two.dir.iterdir()) == sorted(
            [".lock", "meta.json"] + [s["file"] for s in two.meta["shards"]]
        )
    for name in ("full", "cut"):  # each rank wrote shards of its own batches
        shards = ActivationCache(tmp_path / "two" / name).meta["shards"]
        assert {tuple({b % WORLD for b in s["batches"]}) for s in shards} == {(0,), (1,)}
    for name in ("resumed", "mixed"):  # the cached batches were skipped, the rest run once, on some rank
        ranks = [json.loads((tmp_path / "two" / f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]
        cached = ranks[0]["cached"]
        assert (
            0 < cached < 8
            and ranks[1]["cached"] == cached
            and sum(r["forwards"] for r in ranks) == 16 - cached
        ), ranks


# --- reading --------------------------------------------------------------------------------------------


def _numbered(path: Path, shards: int = 10, n: int = 96) -> ActivationCache:
    """A cache whose token i has activation [i, -i] in the module `m`: each row names its token."""
    i = torch.arange(shards * n)
    return handmade_cache(path, list(torch.stack([i, -i], 1).float().split(n)))


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
    if in_memory:  # one module: the cache holds exactly what an in-memory harvest of its whole batches holds
        tokens = ActivationCache(tmp_path / "cache").tokens
        assert tokens >= 2048
        pl.run_training(
            _job(tmp_path, corpus, "uncached", in_memory=True, cache_dir=None, harvest_tokens=tokens)
        )
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
