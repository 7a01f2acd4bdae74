"""Data-parallel training through the pipeline, every rank's result compared: a short `train.py` run of the
tiny model under torchrun (NCCL on GPUs, gloo on the CPU), as `tests/test_ddp.py` runs it.

    python bench/ddp.py --nproc 2 --device cuda           # two GPUs, NCCL
    python bench/ddp.py --nproc 2 --device cpu --steps 40 # two CPU processes, gloo

Runs `torchrun --standalone --nproc_per_node=N train.py ...` (streamed harvest, checkpoints, evaluation on
rank 0), except that each rank also writes the SAE it trained to `<out>/rank<r>.safetensors`: the pipeline
keeps rank 0's alone. Then checks that the run finished (metrics.json, a finite FVU below 1, a checkpoint of
all N ranks at the last step), that every rank ended with the very same weights (all take the same steps
from the same all-reduced gradients), and that the run directory holds them. Prints what it found and exits
non-zero if any check failed.
"""

import argparse
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".made-by-bench-ddp"  # in --out: the folder is this check's, to be replaced on the next run

# As tests/test_ddp.py runs the pipeline: the tiny model, a slice of the Wikipedia sample, small batches.
ARGS = [
    "model=tiny",
    "data=files",
    "train.in_memory=false",
    "train.harvest_tokens=4096",
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


def _corpus(path: Path) -> Path:
    """The first 40 articles of the Wikipedia sample, cut to 3000 characters each, as JSON lines."""
    from sae.data import wikipedia_sample

    rows = [json.loads(line) for line in wikipedia_sample().read_text().splitlines()[:40]]
    path.write_text("".join(json.dumps({"text": r["text"][:3000]}) + "\n" for r in rows))
    return path


def _rank_main(out: Path, overrides: list[str]) -> None:
    """One torchrun worker: `train.py` with these overrides, writing the SAE this rank trained to `out`."""
    from sae import pipeline
    from sae.files import save_tensors

    real_train = pipeline.train

    def train_and_keep(*args, **kwargs):
        sae = real_train(*args, **kwargs)
        save_tensors(out / f"rank{os.environ.get('RANK', '0')}.safetensors", sae.state_dict())
        return sae

    pipeline.train = train_and_keep
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def _launch(nproc: int, out: Path, overrides: list[str], timeout: float) -> tuple[int, float]:
    """Runs the torchrun job; returns (its exit status, seconds). Past `timeout` seconds torchrun is stopped
    with SIGTERM, which it passes on to its workers (they write a checkpoint and exit; it kills those still
    running 30 s later), and the status is 124."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--rank-of",
        str(out),
        "--",
        *overrides,
    ]
    env = os.environ | {"WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"torchrun still running after {timeout:.0f} s: stopping it", flush=True)
        _stop(proc, grace=35)
        code = 124
    finally:
        _stop(proc, grace=4)  # this process was stopped itself (SIGTERM, Ctrl-C): torchrun goes too
    return code, time.perf_counter() - start


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """Sends torchrun SIGTERM, and SIGKILL if it has not exited `grace` seconds later."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _check(out: Path, nproc: int, steps: int) -> list[str]:
    """The checks' failures (none: all passed), printing what was found."""
    from safetensors.torch import load_file

    from sae.model import SAE

    run, failures = out / "run", []
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    fvu = metrics.get("fvu", float("nan"))
    print(f"held-out FVU {fvu:.4f}, L0 {metrics.get('l0', float('nan')):.2f}")
    if not (math.isfinite(fvu) and fvu < 1.0):
        failures.append(f"the run's held-out FVU is {fvu} (expected finite and below 1): {run}/metrics.json")
    state_file = run / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    print(f"checkpoint: world {state.get('world')}, step {state.get('step')}")
    if (state.get("world"), state.get("step")) != (nproc, steps):
        failures.append(
            f"{state_file} holds world {state.get('world')}, step {state.get('step')}: expected {nproc}, {steps}"
        )
    streams = sorted(p.name for p in (run / "checkpoint").glob("stream-rank*.json"))
    if len(streams) != nproc:
        failures.append(f"the checkpoint holds the stream positions of {len(streams)} ranks, not {nproc}")

    ranks = {r: out / f"rank{r}.safetensors" for r in range(nproc)}
    missing = [str(p) for p in ranks.values() if not p.exists()]
    if missing:
        return failures + [f"no SAE written by {', '.join(missing)}"]
    weights = {r: load_file(str(p)) for r, p in ranks.items()}
    for r in range(1, nproc):
        for key, value in weights[0].items():
            diff = (weights[r][key].double() - value.double()).abs().max().item()
            if not torch.equal(weights[r][key], value):
                failures.append(f"rank {r}'s {key} differs from rank 0's by up to {diff:.3g}")
    print(f"{nproc} ranks: {'the same weights' if not failures else 'weights differ'}")
    if (run / "sae.safetensors").exists():
        saved = SAE.load(run).state_dict()
        if any(not torch.equal(saved[k], v) for k, v in weights[0].items()):
            failures.append(f"{run}/sae.safetensors differs from the SAE rank 0 trained")
    else:
        failures.append(f"{run}/sae.safetensors is missing")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes: one per GPU (cuda), or CPU ones")
    parser.add_argument(
        "--device", default="cuda", help="model.device of every rank: cuda (NCCL) or cpu (gloo)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps of the global batch")
    parser.add_argument(
        "--batch-size", type=int, help="the global batch (default: 256, or the multiple of --nproc below)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ddp-check", help="folder for the run")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds before torchrun is stopped (which takes up to 35 s)",
    )
    parser.add_argument("--rank-of", type=Path, help=argparse.SUPPRESS)  # set for the torchrun workers
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.rank_of is not None:
        _rank_main(args.rank_of, overrides)
        return
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))  # stops torchrun on the way out

    batch = args.batch_size or 256 // args.nproc * args.nproc
    out = args.out
    if out.exists():
        if not (out / MARKER).exists():
            sys.exit(
                f"--out {out} exists and was not made by bench/ddp.py: give a folder that does not exist"
            )
        shutil.rmtree(out)  # this check's own folder from an earlier run
    out.mkdir(parents=True)
    (out / MARKER).touch()
    overrides = ARGS + [
        f"data.path={_corpus(out / 'corpus.jsonl')}",
        f"run_dir={out / 'run'}",
        f"model.device={args.device}",
        f"train.batch_size={batch}",
        f"train.tokens={args.steps * batch}",
        *overrides,
    ]
    code, seconds = _launch(args.nproc, out, overrides, args.timeout)
    print(f"torchrun exit status {code} after {seconds:.1f} s")
    if code == 124:
        failures = [f"torchrun did not finish within --timeout {args.timeout:g} s"]
    elif code:
        failures = [f"torchrun exited with status {code} (its workers' errors are above)"]
    else:
        failures = _check(out, args.nproc, args.steps)
    for f in failures:
        print(f"FAILED: {f}")
    if failures:
        sys.exit(1)
    print(f"ok: {args.nproc} ranks on {args.device} trained {args.steps} steps of {batch} tokens and agree")


if __name__ == "__main__":
    main()
