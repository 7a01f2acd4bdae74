"""The analysis pass over a corpus: two shares merged equal one pass; harvested batches encoded without a
forward give what the forwards give; the token bound cuts after a whole batch; an interrupted pass resumes
exactly (in process, and after kill -9); two gloo processes under torchrun equal one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae import harvest, scan
from sae.analyze import FeatureStats, band
from sae.config import AnalyzeConfig, DataConfig, ModelConfig
from sae.data import packed_contexts
from sae.evaluate import held_out_pass
from sae.model import SAE
from sae.pipeline import ANALYSIS_STATE, run_training
from tests.conftest import process_env, run_to_the_end, tiny_job

ROOT = Path(__file__).resolve().parents[1]
MODULE = "model.layers.1"
CFG = AnalyzeConfig(top_k=4, window_before=3, window_after=2, intervals=4, per_interval=3)
EXACT = ("density", "max_act", "top_act", "top_row", "top_pos", "window_ids", "window_acts", "hist_counts")
"""What a merge of shares reproduces bit for bit, equal acts included (the same text repeated: ties are broken by
the tokens' keys). `mean_act` is a float64 sum, equal up to the order of the additions; the band samples, and
`interval_count`, which is at least the samples a band holds, are approximate."""


@pytest.fixture(scope="module")
def small(corpus, tmp_path_factory) -> Path:
    """Ten rows of the Wikipedia slice (one held out), 1,500 characters each: about 120 context batches of 4 x 32
    tokens."""
    path = tmp_path_factory.mktemp("small") / "wiki.jsonl"
    rows = [json.loads(line) for line in corpus.read_text().splitlines()[:10]]
    path.write_text("".join(json.dumps({"text": r["text"][:1500]}) + "\n" for r in rows))
    return path


def data(corpus: Path) -> DataConfig:
    return DataConfig(path=str(corpus), context_size=32)


def model_cfg(max_norm_ratio: float = 0.0) -> ModelConfig:
    return ModelConfig(name="tiny", dtype="float32", batch_size=4, max_norm_ratio=max_norm_ratio)


def run_pass(tiny, corpus, tmp_path, cfg=CFG, **kwargs) -> FeatureStats:
    model, tokenizer = tiny
    stats = scan.analysis_pass(
        SAE(64, 48, 4, seed=2),
        model,
        tokenizer,
        MODULE,
        model_cfg(),
        data(corpus),
        cfg,
        tmp_path / "state",
        **kwargs,
    )
    assert stats is not None
    return stats


def assert_same(a: dict, b: dict, keys=None) -> None:
    for key in keys or a:
        assert torch.equal(a[key], b[key]), key


def assert_bands_hold_real_tokens(stats: FeatureStats, firings: dict) -> None:
    """Every band sample is a firing of its latent, with its act, inside its band of the final max."""
    t = stats.tensors()
    live = t["interval_act"] > 0  # [F, I, n]
    assert live.sum() > 50
    for f, j, s in live.nonzero().tolist():
        act = t["interval_act"][f, j, s]
        assert band(act, t["max_act"][f], CFG.intervals) == j
        key = (f, int(t["interval_row"][f, j, s]), int(t["interval_pos"][f, j, s]))
        assert firings[key] == act.item()


def test_two_shares_merged_equal_one_pass_over_both(tiny, small):
    model, tokenizer = tiny
    sae = SAE(64, 48, 4, seed=2)
    one, shares = FeatureStats(48, CFG), [FeatureStats(48, CFG), FeatureStats(48, CFG)]
    firings = {}
    contexts = packed_contexts(data(small), tokenizer, "train", 4)
    for i, (x, batch, used) in enumerate(harvest.activations(model, MODULE, contexts, 6000)):
        code = sae.encode(x)
        one.update(code, used, batch)
        shares[i % 2].update(code, used, batch)
        n, t = used.nonzero().T
        b, j = (code.acts > 0).nonzero().T
        triples = zip(code.idx[b, j].tolist(), batch.row[n[b], t[b]].tolist(), batch.pos[n[b], t[b]].tolist())
        firings.update(zip(triples, code.acts[b, j].tolist()))
    merged = shares[0]
    merged.merge(shares[1])
    a, b = merged.tensors(), one.tensors()
    assert merged.tokens == one.tokens > 4000
    assert_same(a, b, EXACT)
    torch.testing.assert_close(a["mean_act"], b["mean_act"], rtol=1e-6, atol=0)
    assert not torch.equal(shares[1].count, one.count)  # the shares held different tokens
    # Band samples cannot be exact (each share sampled in the bands of its own max): the weaker property.
    assert_bands_hold_real_tokens(merged, firings)


def test_harvested_batches_are_encoded_without_a_forward_and_give_what_forwards_give(tiny, small, tmp_path):
    model, tokenizer = tiny
    kept: list = []
    contexts = packed_contexts(data(small), tokenizer, "train", 4)
    acts = harvest.harvest_tensors(model, [MODULE], contexts, 3000, 0.0, progress=False, kept=kept)[MODULE]
    assert 0 < len(kept) and sum(int(u.sum()) for _, u in kept) < len(acts)  # the last batch was cut
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        cfg = AnalyzeConfig(**{**vars(CFG), "tokens": 8000})
        replayed = run_pass(tiny, small, tmp_path / "a", cfg, replay=scan.replay_in_memory(acts, kept))
        n_replayed = len(forwards)
        forwarded = run_pass(tiny, small, tmp_path / "b", cfg)
    finally:
        handle.remove()
    batches = len(forwards) - n_replayed
    assert n_replayed == batches - len(kept)  # only the batches not harvested whole ran the model
    assert_same(replayed.tensors(), forwarded.tensors())


def test_held_out_batches_of_the_evaluation_are_analysed_without_a_second_forward(tiny, small, tmp_path):
    model, tokenizer = tiny
    sae, kept = SAE(64, 48, 4, seed=2), []
    metrics = held_out_pass(sae, model, tokenizer, MODULE, model_cfg(), data(small), 10**6, kept)
    assert sum(len(x) for _, x, _, _ in kept) == metrics["held_out_tokens"]
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        replayed = run_pass(tiny, small, tmp_path / "a", held_out=kept)
        n_replayed = len(forwards)
        forwarded = run_pass(tiny, small, tmp_path / "b")
    finally:
        handle.remove()
    assert n_replayed == len(forwards) - n_replayed - len(kept)
    assert_same(replayed.tensors(), forwarded.tensors())


def test_the_token_bound_cuts_after_the_batch_that_reaches_it_and_all_reads_both_splits(
    tiny, small, tmp_path
):
    model, tokenizer = tiny
    first = CFG.skip_positions + 1  # positions 1..skip_positions after BOS count nowhere
    batches = [b for split in ("train", "test") for b in packed_contexts(data(small), tokenizer, split, 4)]
    text, counted = [int(b.mask.sum()) for b in batches], [int(b.mask[:, first:].sum()) for b in batches]
    bounded = run_pass(tiny, small, tmp_path / "a", AnalyzeConfig(**{**vars(CFG), "tokens": text[0] + 1}))
    assert bounded.tokens == counted[0] + counted[1]
    whole = run_pass(tiny, small, tmp_path / "b")
    assert whole.tokens == sum(counted)
    rows = whole.top_row[whole.top_act > 0]
    assert (rows % 10 == 9).any() and (rows % 10 != 9).any()  # held-out rows and training rows


def test_an_interrupted_pass_resumes_exactly_and_refuses_other_settings(tiny, small, tmp_path):
    model, _ = tiny
    reference = run_pass(tiny, small, tmp_path / "ref")
    cfg = AnalyzeConfig(**{**vars(CFG), "checkpoint_every": 3})
    calls, crash_at = [], [20]

    def crash(*_):
        calls.append(1)
        if len(calls) == crash_at[0]:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pass(tiny, small, tmp_path, cfg)
        with pytest.raises(ValueError, match=r"analyze.top_k: 4 -> 5.*without resume=true"):
            run_pass(tiny, small, tmp_path, AnalyzeConfig(**{**vars(cfg), "top_k": 5}), resume=True)
        calls.clear()
        crash_at[0] = 0  # no second interruption
        resumed = run_pass(tiny, small, tmp_path, cfg, resume=True)
    finally:
        handle.remove()
    assert_same(resumed.tensors(), reference.tensors())
    batches = len([b for s in ("train", "test") for b in packed_contexts(data(small), tiny[1], s, 4)])
    assert len(calls) == batches - 18  # the 18 batches of the last saved state did not run again


# --- processes -----------------------------------------------------------------------------------------


def _analyze(run_dir: Path, *extra: str, procs: int = 1) -> list[str]:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    )
    return [sys.executable, *launcher, str(ROOT / "analyze.py"), f"run_dir={run_dir}", *extra]


def _run(cmd: list[str]) -> str:
    return run_to_the_end(cmd).stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small) -> Path:
    """A finished tiny run, not analysed."""
    tmp = tmp_path_factory.mktemp("trained")
    job = tiny_job(tmp, small, data={"context_size": 32})
    run_training(job)
    return Path(job.run_dir)


ARGS = ("analyze.top_k=4", "analyze.intervals=4", "analyze.per_interval=3")


def _features(run_dir: Path) -> dict:
    return load_file(str(run_dir / "analysis" / "features.safetensors"))


@pytest.mark.slow
def test_analysis_killed_with_sigkill_resumes_to_the_uninterrupted_result(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    _run(_analyze(run_dir, *ARGS))
    reference = _features(run_dir)
    shutil.rmtree(run_dir / "analysis")
    proc = subprocess.Popen(
        _analyze(run_dir, *ARGS, "analyze.checkpoint_every=5"),
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    state = run_dir / ANALYSIS_STATE / "rank-0-of-1.safetensors"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and state.exists()
    assert not (run_dir / "analysis" / "features.safetensors").exists()  # killed mid-way
    _run(_analyze(run_dir, *ARGS, "analyze.checkpoint_every=5", "resume=true"))
    assert_same(_features(run_dir), reference)
    assert not (run_dir / ANALYSIS_STATE).exists()


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun_equal_one_process(trained, tmp_path):
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(trained, one)
    shutil.copytree(trained, two)
    _run(_analyze(one, *ARGS))
    out = _run(_analyze(two, *ARGS, procs=2))
    assert out.count("dashboard:") == 1  # rank 0 writes
    a, b = _features(two), _features(one)
    assert_same(a, b, EXACT)
    torch.testing.assert_close(a["mean_act"], b["mean_act"], rtol=1e-6, atol=0)
    meta = json.loads((two / "analysis" / "features.json").read_text())
    assert meta["n_tokens"] == json.loads((one / "analysis" / "features.json").read_text())["n_tokens"]
    live = a["interval_act"] > 0
    assert live.sum() > 50
    bands = band(a["interval_act"], a["max_act"][:, None, None], 4)
    assert (bands == torch.arange(4)[:, None])[live].all()  # every sample in its band of the merged max
