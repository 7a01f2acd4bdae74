"""Data-parallel training on CPU processes with gloo: two ranks, each with its half of every batch, end with
the SAE one process trains on the whole batches; through torchrun the pipeline shards the data, rank 0
writes the run, and a preempted data-parallel run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sae.config import SAEConfig, TrainConfig
from sae.train import train
from tests.conftest import process_env, run_to_the_end

ROOT = Path(__file__).resolve().parents[1]
D, B, STEPS, WORLD = 16, 128, 30, 2


def batches(seed: int = 0) -> list[torch.Tensor]:
    """STEPS global batches [B, D]: sparse codes over a random dictionary plus an offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(40, D, generator=g)
    out = []
    for _ in range(STEPS):
        idx = torch.rand(B, 40, generator=g).argsort(dim=1)[:, :3]
        out.append(torch.zeros(B, 40).scatter_(1, idx, 1 + torch.rand(B, 3, generator=g)) @ atoms + 0.3)
    return out


def config() -> TrainConfig:
    # fp32, so the only difference left is the order of float additions; latents die, so AuxK takes part.
    return TrainConfig(
        tokens=STEPS * B,
        batch_size=B,
        warmup_steps=3,
        log_every=5,
        dead_tokens=4 * B,
        precision="float32",
        eval_every=0,
    )


ARCH_CFGS = {
    "topk": SAEConfig(expansion_factor=8, k=3),
    "topk_multi": SAEConfig(expansion_factor=8, k=3, multi_topk=True),
    "jumprelu": SAEConfig(arch="jumprelu", expansion_factor=4, sparsity_coef=0.01),
    "relu": SAEConfig(arch="relu", expansion_factor=4, sparsity_coef=0.01),
}


def _rank(rank: int, store: str, out: str, arch: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        local = [x[rank * (B // WORLD) : (rank + 1) * (B // WORLD)] for x in batches()]
        sae = train(ARCH_CFGS[arch], config(), iter(local))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out)
        else:
            save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out + ".rank1")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", list(ARCH_CFGS))
def test_two_gloo_ranks_with_half_batches_equal_one_process_on_the_whole_batches(tmp_path, arch):
    out = str(tmp_path / "ddp.safetensors")
    mp.start_processes(_rank, args=(str(tmp_path / "store"), out, arch), nprocs=WORLD, start_method="spawn")
    torch.set_num_threads(1)
    single = train(ARCH_CFGS[arch], config(), iter(batches()))
    ranks = load_file(out), load_file(out + ".rank1")
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: the ranks' weights differ"
        torch.testing.assert_close(
            ranks[0][key], value, rtol=1e-5, atol=1e-6, msg=f"{key}"
        )  # observed: up to 5e-7


def _rank_halves_differ(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # Each rank gets the same half of every batch: a wrong reduction (mean of unweighted FVUs) would
        # still agree here, so this run is the control that the halves above differ per rank.
        local = [x[: B // WORLD] for x in batches()]
        sae = train(ARCH_CFGS["topk"], config(), iter(local))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def test_the_control_data_parallel_run_on_other_data_differs(tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.start_processes(
        _rank_halves_differ, args=(str(tmp_path / "store"), out), nprocs=WORLD, start_method="spawn"
    )
    torch.set_num_threads(1)
    single = train(ARCH_CFGS["topk"], config(), iter(batches()))
    assert (load_file(out)["W_dec"] - single.W_dec).abs().max() > 1e-2


# --- torchrun and the pipeline --------------------------------------------------------------------------

ARGS = [
    "model=tiny",
    "data=files",
    "train.tokens=51200",
    "train.harvest_tokens=4096",
    "train.batch_size=256",
    "train.buffer_tokens=1024",
    "train.checkpoint_every=10",
    "train.log_every=10",
    "train.dead_tokens=2560",
    "eval.tokens=1024",
    "eval.loss_contexts=2",
    "eval.train_loss_contexts=0",
    "data.context_size=64",
    "sae.k=8",
    "sae.expansion_factor=2",
    "model.batch_size=4",
    "wandb.mode=disabled",
    "do_analyze=false",
]


def _torchrun(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        *ARGS,
        f"data.path={corpus}",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.mark.parametrize("mode", ["train.in_memory=false", "train.in_memory=true"])
def test_torchrun_shards_the_data_rank_0_writes_and_sigterm_then_resume_is_exact(tmp_path, corpus, mode):
    reference = tmp_path / "reference"
    proc = run_to_the_end(_torchrun(corpus, reference, mode))
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["fvu"] < 0.9 and not (tmp_path / "reference.tmp").exists()
    ckpt = reference / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["world"], state["step"], state["tokens"]) == (2, 200, 51200)
    streams = [json.loads((ckpt / f"stream-rank{r}.json").read_text()) for r in range(2)]
    if mode.endswith("false"):  # each rank consumed its own context batches
        assert streams[0]["consumed"] > 0 and streams[1]["consumed"] > 0
    ranks = [load_file(str(ckpt / f"stream-rank{r}.safetensors")) for r in range(2)]
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])  # shuffled apart

    run_dir = tmp_path / "run"
    stopped = subprocess.Popen(
        _torchrun(corpus, run_dir, mode),
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    state_file = tmp_path / "run.tmp" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and stopped.poll() is None:
        try:
            if json.loads(state_file.read_text())["step"] >= 20:
                os.killpg(stopped.pid, signal.SIGTERM)  # SLURM signals every task of the job
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    try:
        _, stderr = stopped.communicate(timeout=120)
    finally:
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGKILL)
    assert stopped.returncode != 0 and "SIGTERM received: training stopped after step" in stderr, stderr[
        -3000:
    ]
    at = json.loads(state_file.read_text())["step"]
    assert 20 <= at < 200 and not run_dir.exists()
    run_to_the_end(_torchrun(corpus, run_dir, mode, "resume=true"))
    a, b = load_file(str(run_dir / "sae.safetensors")), load_file(str(reference / "sae.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torchrun_with_an_activation_cache_every_rank_harvests_and_reads_its_share(tmp_path, corpus):
    cache = tmp_path / "cache"
    analysis = ("do_analyze=true", "analyze.tokens=8192", "analyze.top_k=3")
    run_to_the_end(
        _torchrun(corpus, tmp_path / "run", "train.in_memory=false", f"train.cache_dir={cache}", *analysis)
    )
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and meta["tokens"] >= 4096 and "world" not in json.dumps(meta["provenance"])
    # Each rank harvested its own batches (batch i on rank i % 2) into one shard, listed in batch order.
    shards = meta["shards"]
    assert [s["batches"] for s in shards] == [list(range(r, meta["batches"], 2)) for r in range(2)]
    ckpt = tmp_path / "run" / "checkpoint"
    streams = [json.loads((ckpt / f"stream-rank{r}.json").read_text()) for r in range(2)]
    assert all(s["served"] == 200 * 128 for s in streams)  # each rank served its half of every step
    # Two shards, so rank r reads shard r: every token in a rank's shuffle buffer is one of that shard's (tokens
    # whose activations occur more than once in the cache are not told apart).
    where: dict[tuple, list[int]] = {}
    for r, s in enumerate(shards):
        acts = next(v for k, v in load_file(str(cache / s["file"])).items() if k.startswith("acts.")).float()
        for row in acts.tolist():
            where.setdefault(tuple(row), []).append(r)
    for r in range(2):
        rest = load_file(str(ckpt / f"stream-rank{r}.safetensors"))["pass.rest"]
        found = [where[tuple(row)] for row in rest.tolist()]
        unique = [i[0] for i in found if len(i) == 1]
        assert len(unique) > 0.9 * len(rest) > 500
        assert set(unique) == {r}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["fvu"] < 0.9
    # Both ranks analysed their batches (the cached ones replayed), merged on rank 0 into one analysis.
    features = json.loads((tmp_path / "run" / "analysis" / "features.json").read_text())
    assert 7500 < features["n_tokens"] < 8192 + 256  # the batch reaching 8192, less the skipped positions
    assert max(len(f["examples"]) for f in features["features"]) == 3
    assert not (tmp_path / "run" / "analysis-state").exists()
