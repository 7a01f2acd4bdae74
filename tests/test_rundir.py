"""Run directories: a user's files are never deleted, what can be known before the harvest is checked before
it, a late failure does not block a rerun, one job per run directory, finite divergence, the hub offline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_job

from sae import evaluate, pipeline, rundir
from sae.config import DataConfig, ModelConfig
from sae.formats import main as formats_main
from sae.harvest import load_model
from sae.pipeline import run_training
from sae.train import TrainingDiverged

ROOT = Path(__file__).resolve().parent.parent


def _no_training(monkeypatch) -> None:
    """Makes any training fail the test: the checks under test must come before it."""

    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pipeline, "train", trained)


def _leaves_nothing(job) -> None:
    final = Path(job.run_dir)
    assert not final.with_name(final.name + ".tmp").exists()
    assert not final.with_name(final.name + ".lock").exists()


# --- the user's files -----------------------------------------------------------------------------------


def test_a_directory_this_tool_did_not_write_is_refused_and_kept(tmp_path, corpus, monkeypatch):
    _no_training(monkeypatch)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "thesis.txt").write_text("three years of work")
    job = tiny_job(tmp_path, corpus)
    job.run_dir = str(scratch)
    with pytest.raises(
        FileExistsError, match=r"scratch' is a directory this tool did not write \(it holds thesis"
    ):
        run_training(job)
    assert (scratch / "thesis.txt").read_text() == "three years of work"
    _leaves_nothing(job)


def test_a_finished_run_is_replaced_only_with_overwrite_and_never_with_a_users_file(tmp_path, corpus):
    job = tiny_job(tmp_path, corpus)
    run_training(job)
    final = Path(job.run_dir)
    assert (final / rundir.MARKER).is_file()
    with pytest.raises(FileExistsError, match="holds a finished run; pass overwrite=true"):
        run_training(job)
    job.overwrite = True
    first = (final / "sae.safetensors").stat().st_mtime_ns
    run_training(job)
    assert (final / "sae.safetensors").stat().st_mtime_ns != first
    (final / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also holds files this tool did not write \(notes.md\)"):
        run_training(job)
    assert (final / "notes.md").read_text() == "mine"
    _leaves_nothing(job)


def test_an_empty_directory_is_used(tmp_path, corpus):
    job = tiny_job(tmp_path, corpus)
    Path(job.run_dir).mkdir()
    run_training(job)
    assert (Path(job.run_dir) / "sae.safetensors").is_file()


@pytest.mark.parametrize(
    ("run_dir", "error", "words"),
    [
        (".", ValueError, ["run_dir='.'", "not a directory of its own", "run_dir=runs/my-run"]),
        ("file", NotADirectoryError, ["is an existing file"]),
        ("file/run", NotADirectoryError, ["cannot be created", "is a file"]),
    ],
)
def test_a_run_dir_that_cannot_be_a_run_directory_fails_before_any_work(
    tmp_path, corpus, monkeypatch, run_dir, error, words
):
    _no_training(monkeypatch)
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.chdir(tmp_path)
    job = tiny_job(tmp_path, corpus)
    job.run_dir = run_dir
    with pytest.raises(error) as info:
        run_training(job)
    for word in words:
        assert word in str(info.value), info.value
    assert (tmp_path / "file").read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_temporary_directory_not_ours_is_refused(tmp_path, corpus, monkeypatch):
    _no_training(monkeypatch)
    job = tiny_job(tmp_path, corpus)
    (tmp_path / "run.tmp").mkdir()
    (tmp_path / "run.tmp" / "draft.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="run.tmp' exists and was not made by this tool"):
        run_training(job)
    assert (tmp_path / "run.tmp" / "draft.txt").read_text() == "mine"


# --- checked before the harvest -------------------------------------------------------------------------


def test_too_few_held_out_rows_fail_before_training_saying_how_many(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    text = tmp_path / "one-row.txt"  # no blank lines: one row
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 400))
    job = tiny_job(tmp_path, text)
    with pytest.raises(ValueError) as info:
        run_training(job)
    for words in ("1 rows, of which 0 held out", "data.holdout_every=10", "model.batch_size=4", "blank line"):
        assert words in str(info.value), info.value
    _leaves_nothing(job)


def test_a_null_text_in_a_held_out_row_fails_before_training_or_is_skipped(tmp_path, corpus, monkeypatch):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows[9]["text"] = None  # row 9: held out (every 10th)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real_train = pipeline.train
    _no_training(monkeypatch)
    job = tiny_job(tmp_path, bad)
    with pytest.raises(TypeError, match=r"row 9: None.*data.bad_rows=skip"):
        run_training(job)
    _leaves_nothing(job)
    monkeypatch.setattr(pipeline, "train", real_train)
    job.data.bad_rows = "skip"
    assert run_training(job)["held_out_tokens"] > 0


def test_a_context_of_two_tokens_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"data.context_size=2 must be >= 3"):
        DataConfig(context_size=2)
    with pytest.raises(ValueError, match=r"data.bad_rows='drop' is not one of \('error', 'skip'\)"):
        DataConfig(bad_rows="drop")


# --- a late failure -------------------------------------------------------------------------------------


def test_a_late_failure_on_bad_input_does_not_block_a_rerun_and_resume_says_why_it_cannot_help(
    tmp_path, corpus, monkeypatch, capsys
):
    real = evaluate.held_out_pass

    def bad_row(*args, **kwargs):  # bad input met only after training (a hub corpus, read as it streams)
        raise TypeError("data.text_column='text' holds NoneType values (row 1234: None), not text")

    monkeypatch.setattr(evaluate, "held_out_pass", bad_row)
    job = tiny_job(tmp_path, corpus, train={"checkpoint_every": 2})
    with pytest.raises(TypeError):
        run_training(job)
    tmp = tmp_path / "run.tmp"
    assert (tmp / "checkpoint" / "state.json").is_file()
    assert "resume=true would meet the same error" in capsys.readouterr().err
    job.resume = True
    with pytest.raises(ValueError, match="resume=true cannot help: .*row 1234"):
        run_training(job)
    monkeypatch.setattr(evaluate, "held_out_pass", real)
    job.resume = False
    run_training(job)  # a plain rerun starts over
    assert "starting over" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.json").is_file() and not tmp.exists()


# --- one job per run directory --------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from sae.rundir import locked
with locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(final: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(final)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_on_a_run_directory_is_refused_at_once_naming_the_holder(tmp_path, corpus, monkeypatch):
    job = tiny_job(tmp_path, corpus)
    holder = _holder(Path(job.run_dir))
    try:
        _no_training(monkeypatch)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"being written by another job \(pid {holder.pid} on host"):
            run_training(job)
        assert time.monotonic() - start < 5
    finally:
        holder.kill()  # as a crash would: the lock goes with the process, the lock file stays
        holder.wait()
    assert (tmp_path / "run.lock").exists()
    monkeypatch.undo()
    run_training(job)  # the lock of a dead job is no lock
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run.lock").exists()


# --- divergence that stays finite -----------------------------------------------------------------------


def test_a_run_diverged_to_finite_nonsense_exits_naming_train_lr_and_is_not_written(tmp_path, corpus):
    job = tiny_job(tmp_path, corpus, train={"lr": 1e6})
    with pytest.raises(TrainingDiverged, match="train.lr=1000000.0"):
        run_training(job)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.tmp").exists()


# --- the hub, offline -----------------------------------------------------------------------------------


def test_a_hub_model_id_without_the_hub_fails_in_seconds_naming_the_key(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        load_model(ModelConfig(name="sae-tests/no-such-model", device="cpu"))
    assert time.monotonic() - start < 10
    for words in ("model.name='sae-tests/no-such-model'", "127.0.0.1:9", "HF_HUB_OFFLINE=1", "local model"):
        assert words in str(info.value), info.value


def test_a_hub_dataset_id_without_the_hub_fails_in_seconds_naming_the_key(monkeypatch):
    from sae.data import load_rows

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        load_rows(DataConfig(path="sae-tests/no-such-dataset"))
    assert time.monotonic() - start < 10
    for words in ("data.path='sae-tests/no-such-dataset'", "HF_HUB_OFFLINE=1", "data.path=wikipedia-sample"):
        assert words in str(info.value), info.value


# --- smaller messages -----------------------------------------------------------------------------------


def test_exporting_an_unfinished_run_names_it_and_offers_no_checkpoint(tmp_path, corpus, capsys):
    job = tiny_job(tmp_path, corpus, train={"checkpoint_every": 2})
    run_training(job)
    unfinished = tmp_path / "unfinished"
    (tmp_path / "run").rename(unfinished)
    for name in ("sae.safetensors", "cfg.json"):
        (unfinished / name).unlink()
    with pytest.raises(SystemExit):
        formats_main(["saelens", str(unfinished), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "unfinished run" in err and "resume=true" in err and "['checkpoint']" not in err


def test_an_export_to_a_file_or_an_unwritable_place_fails_cleanly(tmp_path, corpus, capsys, monkeypatch):
    job = tiny_job(tmp_path, corpus)
    run_training(job)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        formats_main(["saelens", job.run_dir, str(tmp_path / "a-file")])
    assert exit_.value.code == 2 and "a-file" in capsys.readouterr().err

    import sae.formats

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sae.formats, "save_tensors", full)
    with pytest.raises(SystemExit) as exit_:
        formats_main(["saelens", job.run_dir, str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "No space left on device" in err and "out" in err
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_hydra_offers_only_the_yaml_options_of_a_group():
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "train.py", "sae=foo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0 and "topk" in proc.stderr and "sae_schema" not in proc.stderr
    help_ = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "sae: batchtopk, jumprelu, matryoshka, relu, topk" in help_.stdout
    assert "_schema" not in help_.stdout


def test_sigkill_of_a_lock_holder_frees_the_run_directory(tmp_path):
    final = tmp_path / "run"
    holder = _holder(final)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with rundir.locked(final):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_a_run_dir_on_a_read_only_file_system_fails_before_any_work(tmp_path, corpus, monkeypatch):
    _no_training(monkeypatch)
    job = tiny_job(tmp_path, corpus)
    job.run_dir = str(tmp_path / "ro" / "run")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)  # as access(2) answers on a ro mount
    with pytest.raises(
        PermissionError, match=r"cannot be created: .*ro' is not writable \(read-only file system"
    ):
        run_training(job)
    assert list((tmp_path / "ro").iterdir()) == []
