"""The whole pipeline on the tiny random model: the CLI, a sweep, the notebook, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_job

from sae import stream
from sae.config import ARCHS
from sae.model import SAE
from sae.pipeline import run_training
from sae.train import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny",
    "data=files",
    "train.tokens=6144",
    "train.harvest_tokens=4096",
    "train.batch_size=256",
    "eval.tokens=2048",
    "eval.loss_contexts=4",
    "analyze.tokens=2048",
    "data.context_size=64",
    "sae.k=8",
    "sae.expansion_factor=2",
    "model.batch_size=4",
]


def _run(script: str, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    _run("train.py", *TINY, f"data.path={corpus}", f"run_dir={run_dir}", "wandb.mode=offline")
    return run_dir


def test_cli_writes_a_complete_run_directory(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "sae.safetensors",
        "cfg.json",
        "run.json",
        "metrics.json",
        "checkpoint",
        "analysis",
        "dashboard",
    } <= names
    assert not tiny_run.with_name("tiny.tmp").exists()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(8, abs=0.01)
    assert 0 < metrics["fvu"] < 1
    for key in ("ce_clean", "ce_spliced", "ce_zero", "loss_recovered", "dead_fraction"):
        assert key in metrics
    cfg = json.loads((tiny_run / "cfg.json").read_text())
    assert cfg["hook"] == "model.layers.2" and cfg["d_sae"] == 128 and cfg["k"] == 8
    # The offline W&B run is on disk and `wandb sync`-able.
    assert list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    analysis = json.loads((tiny_run / "analysis" / "features.json").read_text())
    assert len(analysis["features"]) == 128
    example = next(f for f in analysis["features"] if f["examples"])["examples"][0]
    assert example["acts"][example["center"]] == pytest.approx(example["act"], rel=1e-2)
    site = tiny_run / "dashboard"
    assert (site / "feature.html").is_file() and (site / "data" / "index.js").is_file()
    assert len((site / "data" / "features-0.js").read_text().splitlines()) == 1 + 128  # a line a feature


def test_analyze_cli_rewrites_the_dashboard(tiny_run):
    shutil.rmtree(tiny_run / "dashboard")
    proc = _run("analyze.py", f"run_dir={tiny_run}", "analyze.top_k=3", "analyze.tokens=2048")
    assert f"dashboard: {tiny_run / 'dashboard' / 'index.html'}" in proc.stdout
    analysis = json.loads((tiny_run / "analysis" / "features.json").read_text())
    assert max(len(f["examples"]) for f in analysis["features"]) == 3
    assert "SAE_CHUNK(0," in (tiny_run / "dashboard" / "data" / "features-0.js").read_text()


def test_notebook_runs_against_a_real_run(tiny_run):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "dashboard.ipynb", as_version=4)
    os.environ["SAE_RUN_DIR"] = str(tiny_run)
    try:
        nbclient.NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
    finally:
        del os.environ["SAE_RUN_DIR"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("Feature" in json.dumps(o.get("data", {})) for o in outputs)


def test_multirun_sweep_trains_one_run_per_value(corpus, tmp_path):
    _run(
        "train.py",
        "-m",
        *TINY,
        f"data.path={corpus}",
        "sae.k=4,8",
        f"run_dir={tmp_path}/k${{sae.k}}",
        "wandb.mode=disabled",
        "do_analyze=false",
        "eval.loss_contexts=0",
        cwd=tmp_path,
    )
    for k in (4, 8):
        assert json.loads((tmp_path / f"k{k}" / "cfg.json").read_text())["k"] == k


def test_sweep_through_the_submitit_launcher(corpus, tmp_path):
    # The SLURM launcher's code path, with submitit's local executor in place of a cluster: each run of the
    # sweep is a separate submitted job.
    _run(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        *TINY,
        f"data.path={corpus}",
        "sae.k=4,8",
        f"run_dir={tmp_path}/k${{sae.k}}",
        "wandb.mode=disabled",
        "do_analyze=false",
        "eval.loss_contexts=0",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    for k in (4, 8):
        assert json.loads((tmp_path / f"k{k}" / "cfg.json").read_text())["k"] == k
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2


def test_slurm_launcher_config_composes():
    proc = _run("train.py", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert (
        "SlurmLauncher" in proc.stdout
        and "partition: gpu" in proc.stdout
        and "gpus_per_node: 1" in proc.stdout
    )


@pytest.fixture(scope="module")
def every_arch_run(corpus, tmp_path_factory) -> tuple[Path, str]:
    """One harvest of two hooks, six SAEs: every architecture on block 2 and a TopK on block 1."""
    run_dir = tmp_path_factory.mktemp("runs") / "archs"
    saes = "[" + ",".join(f"{{arch:{a}}}" for a in ARCHS) + ",{hook:resid.1}]"
    proc = _run(
        "train.py",
        *TINY,
        f"data.path={corpus}",
        f"run_dir={run_dir}",
        "wandb.mode=offline",
        f"saes={saes}",
        "train.eval_every=10",
        "train.log_every=5",
        "eval.train_loss_contexts=2",
    )
    return run_dir, proc.stdout + proc.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_saves_reloads_and_analyses_from_the_cli(every_arch_run, arch):
    run = every_arch_run[0] / f"{arch}-k8-x2"
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["arch"] == arch and cfg["hook"] == "model.layers.2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] > 0
    assert metrics["explained_variance"] > 1 - metrics["fvu"] - 1e-9  # uncentered >= centered
    assert metrics["kl_spliced"] >= 0 and metrics["delta_ce"] == pytest.approx(
        metrics["ce_spliced"] - metrics["ce_clean"]
    )
    sae = SAE.load(run)
    assert sae.arch == arch
    # Each run directory is a complete run: analysable alone, with its own config and W&B run.
    assert json.loads((run / "run.json").read_text())["sae"]["arch"] == arch
    assert (run / "dashboard" / "index.html").exists() and list((run / "wandb").glob("offline-run-*"))
    shutil.rmtree(run / "dashboard")
    _run("analyze.py", f"run_dir={run}", "analyze.tokens=2048")
    assert f"{arch} SAE, d_sae 128" in (run / "dashboard" / "index.html").read_text()


def test_several_saes_share_one_harvest_across_two_hooks(every_arch_run):
    every_arch_run, output = every_arch_run
    assert output.count("harvest") and output.count("harvest:   0%") == 1
    dirs = sorted(p.name for p in every_arch_run.iterdir() if p.is_dir())
    assert dirs == sorted([f"{a}-k8-x2" for a in ARCHS] + ["topk-k8-x2-resid.1"])
    assert (
        json.loads((every_arch_run / "topk-k8-x2-resid.1" / "cfg.json").read_text())["hook"]
        == "model.layers.1"
    )
    # Re-analysing the block-1 SAE reads block 1, not the job's default block.
    sub_run = every_arch_run / "topk-k8-x2-resid.1"
    _run("analyze.py", f"run_dir={sub_run}", "analyze.tokens=2048")
    meta = json.loads((sub_run / "analysis" / "features.json").read_text())
    assert meta["hook"] == "model.layers.1" and len(meta["features"][0]["nearest"]) == 8
    summary = json.loads((every_arch_run / "metrics.json").read_text())
    assert set(summary) == set(dirs)
    # Console lines every log_every steps, and the in-training evaluation every eval_every steps.
    assert "step 5: " in output and "step 9: log10_density" not in output
    assert sum("loss_recovered=" in line and line.startswith("step 9:") for line in output.splitlines()) == 6


def test_streaming_harvest_trains_through_the_shuffle_buffer(tmp_path, corpus):
    metrics = run_training(tiny_job(tmp_path, corpus, train={"in_memory": False}))
    assert metrics["l0"] == pytest.approx(8, abs=0.01)
    assert (tmp_path / "run" / "sae.safetensors").exists()


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"model": {"module": "model.layer.1"}}, ValueError, ["model.layer.1", "model.layers.1"]),
        ({"model": {"layer": 9}}, ValueError, ["out of range", "4 blocks"]),
        ({"data": {"path": "no/such/file.jsonl"}}, FileNotFoundError, ["no/such/file.jsonl"]),
        ({"data": {"text_column": "body"}}, ValueError, ["'body'", "text"]),
        ({"sae": {"k": 300}}, ValueError, ["sae.k=300", "d_sae=128"]),
    ],
)
def test_bad_input_fails_before_writing_anything(tmp_path, corpus, changes, error, words):
    with pytest.raises(error) as info:
        run_training(tiny_job(tmp_path, corpus, **changes))
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.tmp").exists()


def test_empty_corpus_fails_before_writing_anything(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match="fewer than one batch"):
        run_training(tiny_job(tmp_path, empty))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.tmp").exists()


def test_hub_code_path_loads_a_model_directory(tmp_path, corpus):
    """`model.name` takes a hub id or a local directory through the same from_pretrained call."""
    from sae.harvest import tiny_model, tiny_tokenizer

    tiny_model(seed=3).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    metrics = run_training(tiny_job(tmp_path, corpus, model={"name": str(tmp_path / "model")}))
    assert metrics["l0"] == pytest.approx(8, abs=0.01)
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["model"] == str(tmp_path / "model")


def test_a_diverged_run_keeps_only_its_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    epochs = stream.epochs

    def poisoned(*args, **kwargs):  # batch 6 of the training stream is NaN
        for i, x in enumerate(epochs(*args, **kwargs)):
            yield x.fill_(float("nan")) if i == 6 else x

    monkeypatch.setattr(stream, "epochs", poisoned)
    job = tiny_job(tmp_path, corpus, train={"checkpoint_every": 4, "log_every": 100})
    with pytest.raises(TrainingDiverged, match="last-good-checkpoint") as caught:
        run_training(job)
    kept = tmp_path / "run.last-good-checkpoint"
    assert caught.value.checkpoint == kept and str(kept) in str(caught.value)
    assert json.loads((kept / "state.json").read_text())["step"] == 4
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.tmp").exists()
