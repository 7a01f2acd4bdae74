"""Preemption through the CLI on the tiny model: a training process killed with SIGKILL mid-run, or stopped by
SIGTERM (SLURM's notice), and then resumed with resume=true ends with the very SAE of a run never stopped;
what is left behind meanwhile, and what a run does with a checkpoint it was not told to resume."""

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
    "model=tiny", "data=files", f"train.tokens={STEPS * 256}", "train.harvest_tokens=4096", "train.batch_size=256",
    "train.buffer_tokens=1024", "train.checkpoint_every=10", "train.log_every=10", "train.dead_tokens=2560",
    "train.eval_every=150", "eval.train_loss_contexts=2", "eval.tokens=1024", "eval.loss_contexts=2",
    "data.context_size=64", "sae.k=8", "sae.expansion_factor=2", "model.batch_size=4", "wandb.mode=disabled",
    "do_analyze=false",
]  # fmt: skip
MODES = {"in_memory": ["train.in_memory=true"], "streamed": ["train.in_memory=false"]}


def _command(corpus: Path, run_dir: Path, mode: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *ARGS, *MODES[mode], f"data.path={corpus}",
            f"run_dir={run_dir}", *extra]  # fmt: skip


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
    stopped = _start_and_signal(_command(corpus, run_dir, "streamed"), tmp_path / "run.tmp" / "checkpoint",
                                signal.SIGTERM)  # fmt: skip
    stderr = stopped.stderr.read()  # type: ignore[union-attr]
    assert stopped.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM received: training stopped after step" in stderr
    assert f"run_dir={run_dir} is unfinished: run the same command with resume=true" in stderr
    state = json.loads((tmp_path / "run.tmp" / "checkpoint" / "state.json").read_text())
    assert state["stream"] and (tmp_path / "run.tmp" / "checkpoint" / "stream-rank0.safetensors").exists()
    assert f"after step {state['step']};" in stderr  # the checkpoint is of the step it stopped after

    # Without resume=true the waiting checkpoint is not overwritten, and the message says what to do.
    proc = subprocess.run(_command(corpus, run_dir, "streamed"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert f"checkpointed at step {state['step']}: pass resume=true to continue it" in proc.stderr
    assert json.loads((tmp_path / "run.tmp" / "checkpoint" / "state.json").read_text()) == state

    _run(_command(corpus, run_dir, "streamed", "resume=true"))
    _assert_same_sae(run_dir, reference["streamed"])
    # A finished run has nothing to resume.
    proc = _run(_command(corpus, run_dir, "streamed", "resume=true"))
    assert "is finished: nothing to resume" in proc.stdout
