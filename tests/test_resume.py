"""Checkpoints and exact resume of `train()`: a run cut short and resumed from its last checkpoint ends with
the very weights of a run never stopped, whatever feeds it (in-memory passes, a streaming shuffle buffer, an
activation cache, any iterable), through the background prefetch; signals write a checkpoint and stop;
corrupt checkpoints fail naming the file."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import handmade_cache

from sae.checkpoint import find_checkpoint, save_checkpoint
from sae.config import SAEConfig, TrainConfig
from sae.files import save_tensors, write_json
from sae.model import SAE
from sae.stream import Epochs, Prefetch, Shuffled
from sae.train import Interrupted, pass_on, train

D, B, STEPS = 16, 64, 40


def data(n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Tokens x [n, D]: sparse codes over a random dictionary plus an offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(48, D, generator=g)
    idx = torch.rand(n, 48, generator=g).argsort(dim=1)[:, :3]
    return torch.zeros(n, 48).scatter_(1, idx, 1 + torch.rand(n, 3, generator=g)) @ atoms + 0.5


def cfg(**kw) -> TrainConfig:
    # dead_tokens small enough that latents die and AuxK runs: its dead set is part of the state.
    kw = (
        dict(
            tokens=STEPS * B,
            batch_size=B,
            warmup_steps=3,
            log_every=5,
            checkpoint_every=7,
            dead_tokens=6 * B,
            eval_every=0,
        )
        | kw
    )
    return TrainConfig(**kw)


SAE_CFG = SAEConfig(expansion_factor=16, k=2)  # wide and sparse: some latents die


def streams():
    """Builders of the batch streams train() is fed, each fresh from its seed."""
    x = data()

    def in_memory():
        return Epochs(x, B, STEPS * B, torch.Generator().manual_seed(1))

    def shuffle_buffer():
        # An endless source of 37-token chunks; the buffer holds ~300 tokens, emitted half at a time.
        def chunks(start):
            i = start
            while True:
                yield x[(i * 37) % 1900 : (i * 37) % 1900 + 37]
                i += 1

        return Shuffled(chunks, 300, B, torch.Generator().manual_seed(2))

    def plain():  # no saved position: a resumed run replays it
        g = torch.Generator().manual_seed(3)
        return (x[torch.randint(len(x), (B,), generator=g)] for _ in range(10**6))

    return {"in_memory": in_memory, "shuffle_buffer": shuffle_buffer, "plain": plain}


class Killed(Exception):
    pass


class DiesAt:
    """A stream that raises `Killed` at batch `n`, as a process killed there would stop; keeps the stream's
    state and restore."""

    def __init__(self, stream, n: int):
        self.stream, self.n, self.i = iter(stream), n, 0
        if hasattr(stream, "state"):
            self.state, self.restore = stream.state, stream.restore

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.n:
            raise Killed
        self.i += 1
        return next(self.stream)


def weights(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sae.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max()}"


@pytest.mark.parametrize("prefetched", [False, True])
@pytest.mark.parametrize("kind", ["in_memory", "shuffle_buffer", "plain"])
def test_a_run_cut_short_and_resumed_ends_with_identical_weights(tmp_path, kind, prefetched):
    make = streams()[kind]

    def feed(stream):
        return Prefetch(stream, depth=3) if prefetched else stream

    reference = weights(train(SAE_CFG, cfg(), feed(make()), checkpoint_dir=tmp_path / "a"))
    with pytest.raises(Killed):
        train(SAE_CFG, cfg(), feed(DiesAt(make(), 24)), checkpoint_dir=tmp_path / "b")
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 21 and state["stream"] == (kind != "plain")  # the last checkpoint before the kill
    resumed = train(SAE_CFG, cfg(), feed(make()), checkpoint_dir=tmp_path / "b", resume=True)
    assert_identical(weights(resumed), reference)
    # And the final checkpoints agree too: optimizer moments, counters, stream state.
    for name in ("optimizer.safetensors", "loop.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_cut_is_where_it_hurts_most(tmp_path):
    # Resuming with resume=False starts over: a control that the resumed weights are not equal by accident.
    make = streams()["shuffle_buffer"]
    reference = weights(train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "a"))
    with pytest.raises(Killed):
        train(SAE_CFG, cfg(), DiesAt(make(), 24), checkpoint_dir=tmp_path / "b")
    # Resuming on a stream that restarts from the beginning (its state not restored) gives other weights.
    fresh = make()
    fresh.restore = lambda state: None  # type: ignore[method-assign]
    other = weights(train(SAE_CFG, cfg(), fresh, checkpoint_dir=tmp_path / "b", resume=True))
    assert not torch.equal(other["W_dec"], reference["W_dec"])


def test_resume_of_a_cache_stream_is_exact(tmp_path):
    x = data(960)
    cache = handmade_cache(tmp_path / "cache", list(x.split(96)))

    def make():
        return cache.batches("m", B, STEPS * B, torch.Generator().manual_seed(4), buffer_tokens=200)

    reference = weights(train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "a"))
    with pytest.raises(Killed):
        train(
            SAE_CFG, cfg(), DiesAt(make(), 17), checkpoint_dir=tmp_path / "b"
        )  # mid-pass: 15 batches a pass
    resumed = train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "b", resume=True)
    assert_identical(weights(resumed), reference)


@pytest.mark.parametrize("stream_kind", ["in_memory", "shuffle_buffer"])
def test_a_stream_resumed_from_its_state_continues_with_the_same_batches(stream_kind):
    make = streams()[stream_kind]
    whole = [b.clone() for _, b in zip(range(30), make())]
    first = make()
    states = []
    for _, _b in zip(range(13), first):
        states.append(first.state())
    again = make()
    again.restore(states[-1])
    for i, b in zip(range(13, 30), again):
        assert torch.equal(b, whole[i])


def test_prefetch_state_belongs_to_the_last_item_consumed_not_the_producers_position():
    x = data(500)
    stream = Prefetch(Epochs(x, B, 10**6, torch.Generator().manual_seed(0)), depth=4)
    taken = [next(stream) for _ in range(5)]
    state = stream.state()
    stream.close()
    assert state is not None and state["served"] == 5 * B  # the producer was up to 4 batches further
    again = Epochs(x, B, 10**6, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(taken, [next(again) for _ in range(5)]))
    resumed = Epochs(x, B, 10**6, torch.Generator().manual_seed(0))
    resumed.restore(state)
    assert torch.equal(next(resumed), next(again))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2])
def test_a_signal_stops_training_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, signum):
    make = streams()["in_memory"]
    reference = weights(train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "a"))

    def log(metrics, step):
        if step == 10:
            os.kill(os.getpid(), signum)  # as SLURM's preemption notice or a Ctrl-C would

    with pytest.raises(Interrupted, match=f"{signal.Signals(signum).name} received.*after step 11") as caught:
        train(SAE_CFG, cfg(), make(), log=log, checkpoint_dir=tmp_path / "b")
    assert caught.value.step == 11 and caught.value.checkpoint == tmp_path / "b"
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 11  # not a multiple of 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "b", resume=True)
    assert_identical(weights(resumed), reference)


def test_resume_without_a_checkpoint_starts_fresh_and_a_finished_run_does_no_more_steps(tmp_path):
    make = streams()["in_memory"]
    a = weights(train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "a", resume=True))
    b = weights(train(SAE_CFG, cfg(), make(), checkpoint_dir=tmp_path / "b"))
    assert_identical(a, b)
    logged = []
    again = train(
        SAE_CFG, cfg(), make(), log=lambda m, s: logged.append(s), checkpoint_dir=tmp_path / "a", resume=True
    )
    assert logged == [] and json.loads((tmp_path / "a" / "state.json").read_text())["step"] == STEPS
    assert_identical(weights(again), a)


def test_a_crash_between_the_checkpoint_swaps_renames_leaves_the_old_one(tmp_path):
    make = streams()["in_memory"]
    train(SAE_CFG, cfg(tokens=14 * B), make(), checkpoint_dir=tmp_path / "ck")
    # As if killed after renaming ck to ck.old and before renaming ck.new to ck:
    (tmp_path / "ck").rename(tmp_path / "ck.old")
    (tmp_path / "ck.new").mkdir()
    (tmp_path / "ck.new" / "sae.safetensors").write_bytes(b"half")
    assert find_checkpoint(tmp_path / "ck") == tmp_path / "ck.old"
    train(SAE_CFG, cfg(tokens=20 * B), make(), checkpoint_dir=tmp_path / "ck", resume=True)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 20
    assert not (tmp_path / "ck.old").exists() and not (tmp_path / "ck.new").exists()


# --- corrupt checkpoints --------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path) -> Path:
    train(SAE_CFG, cfg(tokens=14 * B), streams()["in_memory"](), checkpoint_dir=tmp_path / "ck")
    return tmp_path / "ck"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _truncate(p / "state.json"), r"checkpoint state .*state.json"),
        (lambda p: (p / "state.json").write_text('{"step": 3}'), r"lacks \['tokens', 'input_scale'"),
        (lambda p: _truncate(p / "sae.safetensors"), r"SAE weights file .*sae.safetensors is truncated"),
        (
            lambda p: _truncate(p / "optimizer.safetensors"),
            r"checkpoint optimizer file .* truncated or corrupt",
        ),
        (lambda p: (p / "optimizer.safetensors").unlink(), r"checkpoint optimizer file .* does not exist"),
        (
            lambda p: save_tensors(p / "optimizer.safetensors", {"W_dec.exp_avg": torch.zeros(2)}),
            r"optimizer.safetensors: .* is missing, expected shape",
        ),
        (lambda p: _truncate(p / "loop.safetensors"), r"checkpoint loop file .* truncated or corrupt"),
        (
            lambda p: save_tensors(p / "loop.safetensors", {"since_fired": torch.zeros(3)}),
            r"loop.safetensors: since_fired is missing or not of shape \[256\]",
        ),
        (
            lambda p: _truncate(p / "stream-rank0.safetensors"),
            r"stream file of rank 0 .* truncated or corrupt",
        ),
        (lambda p: (p / "stream-rank0.json").unlink(), r"stream state of rank 0 .*does not exist"),
    ],
)
def test_a_damaged_checkpoint_fails_naming_the_file(tmp_path, damage, message):
    ckpt = _checkpoint(tmp_path)
    damage(ckpt)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(SAE_CFG, cfg(), streams()["in_memory"](), checkpoint_dir=ckpt, resume=True)


def test_a_checkpoint_of_another_sae_or_world_size_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"holds an SAE .*'k': 2.*but this run trains .*'k': 8"):
        train(
            SAEConfig(expansion_factor=4, k=8),
            cfg(),
            streams()["in_memory"](),
            checkpoint_dir=ckpt,
            resume=True,
        )
    state = json.loads((ckpt / "state.json").read_text())
    write_json(ckpt / "state.json", state | {"world": 2})
    with pytest.raises(
        ValueError, match=r"written by 2 data-parallel processes, but this run has 1.*nproc_per_node=2"
    ):
        train(SAE_CFG, cfg(), streams()["in_memory"](), checkpoint_dir=ckpt, resume=True)


def test_save_checkpoint_replaces_the_directory_whole(tmp_path):
    sae = SAE(D, 4 * D, 4)
    opt = torch.optim.Adam(sae.parameters())
    ckpt = tmp_path / "ck"
    save_checkpoint(sae, opt, {"step": 1}, ckpt, stream={"a": torch.ones(2), "n": 1})
    (ckpt / "stale").write_text("from an older checkpoint")
    save_checkpoint(sae, opt, {"step": 2}, ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "cfg.json",
        "optimizer.safetensors",
        "sae.safetensors",
        "state.json",
    ]
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 2, "world": 1, "stream": False}


def test_pass_on_hands_the_signal_to_the_handler_there_before_or_exits_with_128_plus_it():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # as submitit's
    try:
        with pytest.raises(SystemExit) as caught:
            pass_on(signal.SIGUSR2)
        assert calls == [signal.SIGUSR2] and caught.value.code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, previous)
    with pytest.raises(SystemExit) as caught:
        pass_on(signal.SIGINT)  # Python's own Ctrl-C handler is not called: no KeyboardInterrupt traceback
    assert caught.value.code == 130
