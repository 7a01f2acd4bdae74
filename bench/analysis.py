"""The analysis pass (`sae.scan.analysis_pass`) against its floor, from the model and from the activation cache,
its peak memory as the tokens grow, and 1 against 2 processes: all in one run, on SmolLM2 and the Wikipedia
sample, with a trained SAE.

    python bench/analysis.py --run runs/demo                       # all four tables
    python bench/analysis.py --run runs/demo --tokens 32768 --skip memory,processes

1. speed from the model: the pass over the first `--tokens` text tokens against harvest + encode of the same
   context batches (`harvest.capture_kept` then `SAE.encode`, nothing kept): the ratio is the pass's overhead
   for the statistics (keep it >= 0.95).
2. speed from the cache: the same pass with the batches replayed from an activation cache harvested here
   (`ActivationCache.replay`: encode only, no forward) against the pass from the model: the speed-up.
3. peak memory (host RSS) of the pass at 65,536, 655,360 tokens and the whole corpus, each in a fresh
   process (`analyze.py`): flat in tokens.
4. processes: `analyze.py` on 1 process and under torchrun on 2 (gloo) on the same tokens: wall time of each
   and whether the saved statistics are identical (band samples aside, see `sae.analyze`).

Absolute times on a shared machine are noise; the ratios are the result.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae import harvest, rundir, scan  # noqa: E402
from sae.cache import write_cache  # noqa: E402
from sae.config import AnalyzeConfig  # noqa: E402
from sae.data import packed_contexts  # noqa: E402

EXACT = ("density", "max_act", "top_act", "top_row", "top_pos", "window_ids", "window_acts", "hist_counts")


def _pass(run, cfg: AnalyzeConfig, replay=()) -> tuple[float, int]:
    """Seconds and tokens of one analysis pass."""
    job = run.job
    with tempfile.TemporaryDirectory() as state:
        start = time.perf_counter()
        stats = scan.analysis_pass(
            run.sae, run.model, run.tokenizer, run.module, job.model, job.data, cfg, Path(state), replay
        )
        assert stats is not None
        return time.perf_counter() - start, stats.tokens


@torch.no_grad()
def _floor(run, tokens: int) -> float:
    """Seconds of harvest + encode of the batches a pass over `tokens` reads, training rows first."""
    job, seen = run.job, 0
    start = time.perf_counter()
    for split in ("train", "test"):
        for batch in packed_contexts(job.data, run.tokenizer, split, job.model.batch_size):
            xs, _ = harvest.capture_kept(run.model, [run.module], batch, job.model.max_norm_ratio)
            run.sae.encode(xs[run.module].float())
            seen += int(batch.mask.sum())
            if seen >= tokens:
                return time.perf_counter() - start
    return time.perf_counter() - start


def speed(run, tokens: int) -> None:
    cfg = AnalyzeConfig(tokens=tokens)
    floor = _floor(run, tokens)
    t_model, n = _pass(run, cfg)
    print(f"\n## speed from the model ({n:,} tokens analysed)")
    print("| | s | tok/s |\n|---|---|---|")
    print(f"| harvest + encode | {floor:.1f} | {n / floor:,.0f} |")
    print(f"| analysis pass | {t_model:.1f} | {n / t_model:,.0f} |")
    print(f"analysis / (harvest + encode) throughput: {floor / t_model:.3f}")

    job = run.job
    with tempfile.TemporaryDirectory() as directory:
        contexts = packed_contexts(job.data, run.tokenizer, "train", job.model.batch_size)
        t0 = time.perf_counter()
        cache = write_cache(
            directory, run.model, [run.module], contexts, tokens, job.model.max_norm_ratio, {}
        )
        harvest_s = time.perf_counter() - t0
        t_cache, n_cache = _pass(run, cfg, cache.replay(run.module))
    print(f"\n## speed from the cache ({n_cache:,} tokens; harvesting the cache took {harvest_s:.1f} s)")
    print("| | s | tok/s |\n|---|---|---|")
    print(f"| pass from the model | {t_model:.1f} | {n / t_model:,.0f} |")
    print(f"| pass from the cache | {t_cache:.1f} | {n_cache / t_cache:,.0f} |")
    print(f"speed-up of the cache: {t_model / t_cache:.1f}x")


def _analyze(run_dir: Path, tokens: str, procs: int = 1, threads: int | None = None) -> tuple[float, float]:
    """(wall seconds, peak host RSS GiB of rank 0, as analyze.py prints it) of `analyze.py` on `run_dir`."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    )
    cmd = [
        sys.executable,
        *launcher,
        str(ROOT / "analyze.py"),
        f"run_dir={run_dir}",
        f"analyze.tokens={tokens}",
    ]
    env = os.environ | {"WANDB_SILENT": "true"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("peak memory of the analysis")]
    return wall, float(line.split("host ")[1].split()[0])


def memory(run_dir: Path) -> None:
    print("\n## peak memory of the analysis (host RSS, one fresh process each)")
    print("| analyze.tokens | tokens analysed | wall s | peak RSS GiB |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("dashboard", "wandb", "checkpoint"))
        for tokens in ("65536", "655360", "all"):
            wall, peak = _analyze(copy, tokens)
            n = json.loads((copy / "analysis" / "features.json").read_text())["n_tokens"]
            print(f"| {tokens} | {n:,} | {wall:.0f} | {peak:.2f} |")


def processes(run_dir: Path, tokens: int) -> None:
    print(f"\n## 1 against 2 processes (analyze.tokens={tokens:,}; 2 gloo ranks under torchrun)")
    print("| processes | wall s | peak RSS GiB of rank 0 |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for procs in (1, 2):
            copy = Path(tmp) / f"run{procs}"
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("dashboard", "wandb", "checkpoint"))
            wall, peak = _analyze(copy, str(tokens), procs, threads=None if procs == 1 else 1)
            out[procs] = load_file(str(copy / "analysis" / "features.safetensors"))
            print(f"| {procs} | {wall:.0f} | {peak:.2f} |")
        same = [k for k in EXACT if torch.equal(out[1][k], out[2][k])]
        print(f"identical in 1 and 2 processes: {', '.join(same)} ({len(same)} of {len(EXACT)})")
        rel = ((out[1]["mean_act"] - out[2]["mean_act"]).abs() / out[1]["mean_act"].clamp_min(1e-12)).max()
        print(f"mean_act: largest relative difference {rel:.1e} (float64 sums in another order)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", default="runs/demo", help="a finished run directory (make demo writes runs/demo)"
    )
    parser.add_argument("--tokens", type=int, default=65_536, help="tokens of the speed and process tables")
    parser.add_argument(
        "--skip", default="", help="tables to skip: speed, memory, processes (comma-separated)"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    run_dir = Path(args.run)
    torch.set_grad_enabled(False)
    if "speed" not in skip:
        speed(rundir.open_run(run_dir), args.tokens)
    if "memory" not in skip:
        memory(run_dir)
    if "processes" not in skip:
        processes(run_dir, args.tokens)


if __name__ == "__main__":
    main()
