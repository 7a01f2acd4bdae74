"""Preemption through the CLI on the tiny model: a training process killed with SIGKILL mid-run, or stopped by
SIGTERM (SLURM's notice), and then resumed with resume=true ends with the very SAE of a run never stopped;
what is left behind meanwhile, and what a run does with a checkpoint it was not told to resume."""

import dataclasses
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

ROOT = Path(__file__).resolve().parents[1]
STEPS = 400
ARGS = [
    "model=tiny",
    "data=files",
    f"train.tokens={STEPS * 256}",
    "train.harvest_tokens=4096",
    "train.batch_size=256",
    "train.buffer_tokens=1024",
    "train.checkpoint_every=10",
    "train.log_every=10",
    "train.dead_tokens=2560",
    "train.eval_every=150",
    "eval.train_loss_contexts=2",
    "eval.tokens=1024",
    "eval.loss_contexts=2",
    "data.context_size=64",
    "sae.k=8",
    "sae.expansion_factor=2",
    "model.batch_size=4",
    "wandb.mode=disabled",
    "do_analyze=false",
]
MODES = {"in_memory": ["train.in_memory=true"], "streamed": ["train.in_memory=false"]}


def _command(corpus: Path, run_dir: Path, mode: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *ARGS,
        *MODES[mode],
        f"data.path={corpus}",
        f"run_dir={run_dir}",
        *extra,
    ]


def _env() -> dict:
    return os.environ | {"WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start_and_signal(
    cmd: list[str], checkpoint: Path, signum: int, after_step: int = 20
) -> subprocess.Popen:
    """Starts `cmd` and sends it `signum` as soon as its checkpoint has reached `after_step`."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            step = json.loads((checkpoint / "state.json").read_text())["step"]
        except (OSError, ValueError):  # not written yet, or swapped in just now
            step = 0
        if step >= after_step:
            proc.send_signal(signum)
            break
        time.sleep(0.002)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, one per data mode."""
    out = {}
    for mode in MODES:
        run_dir = tmp_path_factory.mktemp("reference") / mode
        _run(_command(corpus, run_dir, mode))
        out[mode] = run_dir
    return out


def _assert_same_sae(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key}: max |diff| {(wa[key] - wb[key]).abs().max()}"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("fvu", "l0", "dead_fraction", "ce_spliced", "loss_recovered"):
        assert ma[key] == mb[key], key


@pytest.mark.parametrize("mode", list(MODES))
def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path, corpus, reference, mode):
    run_dir = tmp_path / "run"
    tmp = tmp_path / "run.tmp"
    killed = _start_and_signal(_command(corpus, run_dir, mode), tmp / "checkpoint", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not run_dir.exists()  # no run directory before the run is whole
    at = json.loads((tmp / "checkpoint" / "state.json").read_text())["step"]
    assert 20 <= at < STEPS
    proc = _run(_command(corpus, run_dir, mode, "resume=true"))
    assert f"| {at}/{STEPS} [" in proc.stderr  # training went on from the checkpoint's step
    assert not tmp.exists() and (run_dir / "sae.safetensors").exists()
    _assert_same_sae(run_dir, reference[mode])


def test_sigterm_writes_a_checkpoint_exits_143_and_resume_gives_identical_weights(
    tmp_path, corpus, reference
):
    run_dir = tmp_path / "run"
    stopped = _start_and_signal(
        _command(corpus, run_dir, "streamed"), tmp_path / "run.tmp" / "checkpoint", signal.SIGTERM
    )
    stderr = stopped.stderr.read()  # type: ignore[union-attr]
    assert stopped.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM received: training stopped after step" in stderr
    assert f"run_dir={run_dir} is unfinished: run the same command with resume=true" in stderr
    state = json.loads((tmp_path / "run.tmp" / "checkpoint" / "state.json").read_text())
    assert state["stream"] and (tmp_path / "run.tmp" / "checkpoint" / "stream-rank0.safetensors").exists()
    assert f"after step {state['step']};" in stderr  # the checkpoint is of the step it stopped after

    # Without resume=true the waiting checkpoint is not overwritten, and the message says what to do.
    proc = subprocess.run(
        _command(corpus, run_dir, "streamed"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"checkpointed at step {state['step']}: pass resume=true to continue it" in proc.stderr
    assert json.loads((tmp_path / "run.tmp" / "checkpoint" / "state.json").read_text()) == state

    _run(_command(corpus, run_dir, "streamed", "resume=true"))
    _assert_same_sae(run_dir, reference["streamed"])
    # A finished run has nothing to resume.
    proc = _run(_command(corpus, run_dir, "streamed", "resume=true"))
    assert "is finished with these settings: nothing to resume" in proc.stdout
    # With other settings there is nothing to resume either: it is a new run, trained from scratch, which
    # replaces the finished one only when asked to.
    proc = _run(_command(corpus, run_dir, "streamed", "resume=true", "train.lr=0.002", "overwrite=true"))
    assert "nothing to resume" not in proc.stdout and f"| 0/{STEPS} [" in proc.stderr
    assert json.loads((run_dir / "run.json").read_text())["train"]["lr"] == 0.002


def test_a_schedulers_own_handler_gets_the_signal_after_the_checkpoint(tmp_path, corpus):
    # As under submitit, which handles SIGUSR2 (SLURM's time-limit notice) by requeueing the job.
    marker = tmp_path / "requeued"
    run_dir = tmp_path / "run"
    wrapper = (
        "import runpy, signal, sys\n"
        "def requeue(signum, frame):\n"
        f"    open({str(marker)!r}, 'w').write(str(signum))\n"
        "    sys.exit(3)\n"
        "signal.signal(signal.SIGUSR2, requeue)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    cmd = [sys.executable, "-c", wrapper, *_command(corpus, run_dir, "in_memory")[1:]]
    proc = _start_and_signal(cmd, tmp_path / "run.tmp" / "checkpoint", signal.SIGUSR2)
    stderr = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.returncode == 3, stderr[-3000:]
    assert marker.read_text() == str(int(signal.SIGUSR2))
    assert "SIGUSR2 received: training stopped after step" in stderr
    step = json.loads((tmp_path / "run.tmp" / "checkpoint" / "state.json").read_text())["step"]
    assert f"after step {step};" in stderr


def test_resuming_several_saes_keeps_the_finished_ones_and_continues_the_interrupted_one(
    tmp_path, corpus, monkeypatch
):
    from conftest import tiny_job

    from sae import pipeline
    from sae.train import Interrupted

    def job(name: str, **kw):
        j = tiny_job(
            tmp_path / name, corpus, train={"tokens": 40 * 256, "checkpoint_every": 5, "log_every": 5}
        )
        j.saes = [{"k": 4}, {"k": 8, "hook": "resid.2"}]  # two hooks: a resumed harvest must take both
        return dataclasses.replace(j, **kw)

    reference = pipeline.run_training(job("a"))
    real_train, calls = pipeline.train, []

    def stopped_in_the_second(*args, **kwargs):
        calls.append(args[0].k)
        if len(calls) == 2:  # SIGTERM arrives while the second SAE trains
            log = kwargs["log"]
            kwargs["log"] = lambda m, s: (log(m, s), s == 10 and os.kill(os.getpid(), signal.SIGTERM))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train", stopped_in_the_second)
    with pytest.raises(Interrupted, match="after step 11"):
        pipeline.run_training(job("b"))
    tmp = tmp_path / "b" / "run.tmp"
    assert (tmp / "topk-k4-x2" / "metrics.json").exists() and not (
        tmp / "topk-k8-x2-resid.2" / "metrics.json"
    ).exists()
    changed = job("b", resume=True)
    changed.train.lr = 3e-3
    with pytest.raises(
        ValueError,
        match=r"topk-k8-x2-resid.2/checkpoint with the settings it started with, but "
        r"train.lr: None -> 0.003; restore them",
    ):
        pipeline.run_training(changed)
    assert (tmp / "topk-k8-x2-resid.2" / "checkpoint" / "state.json").exists()  # refused, and nothing lost
    calls.clear()
    resumed = pipeline.run_training(job("b", resume=True))
    assert calls == [8]  # the finished SAE is not trained again
    for name in ("topk-k4-x2", "topk-k8-x2-resid.2"):
        assert resumed[name]["fvu"] == reference[name]["fvu"]
        a = load_file(str(tmp_path / "a" / "run" / name / "sae.safetensors"))
        b = load_file(str(tmp_path / "b" / "run" / name / "sae.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_stream_skips_whole_passes_without_reading_them(tmp_path, tiny, sentences, monkeypatch):
    import threading

    from conftest import tiny_job

    from sae import pipeline

    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    job = tiny_job(tmp_path, corpus, train={"in_memory": False, "batch_size": 32, "buffer_tokens": 128})
    job.model.batch_size = 1
    model, tokenizer = tiny
    module = "model.layers.1"

    def stream():
        return pipeline._streamed(job, model, tokenizer, module, threading.Lock())

    first = stream()
    for _ in zip(range(250), first):
        pass
    state = first.state()
    per_pass = sum(1 for _ in pipeline._train_contexts(job, tokenizer))
    assert state["consumed"] > 4 * per_pass  # the stream went round the small corpus several times

    passes_read = []
    contexts = pipeline._train_contexts
    monkeypatch.setattr(pipeline, "_train_contexts", lambda *a: passes_read.append(1) or contexts(*a))
    resumed = stream()
    resumed.restore(state)
    more = [b.clone() for _, b in zip(range(20), resumed)]
    # The first pass is read for its length, then the resumed one; the ones between are skipped unread.
    assert len(passes_read) <= 3
    again = [b.clone() for _, b in zip(range(270), stream())][250:]
    assert all(torch.equal(a, b) for a, b in zip(more, again))
