"""Seed variance: how much an SAE's metrics move when only `train.seed` changes, so a gap between two SAEs
can be read against it (several popular SAE metrics are noisier than assumed, arXiv 2605.18229).

    python bench/seeds.py --data synthetic --seeds 5                             # TopK on the synthetic dictionary
    python bench/seeds.py --data synthetic --seeds 5 -- sae=matryoshka
    python bench/seeds.py --seeds 3 -- train.tokens=500000 train.harvest_tokens=200000 eval.loss_contexts=32
    python bench/seeds.py --seeds 5 --absorption -- sae=matryoshka sae.k=16       # any config: Hydra overrides
    python bench/seeds.py --data synthetic --seeds 5 --compare runs/seeds/synthetic-sae=matryoshka

Trains one config `--seeds` times through the real entry point (`python train.py ... train.seed=S
run_dir=OUT/seed-S resume=true`, one subprocess after another; `train.seed` sets the SAE's initialisation and
the order of the training tokens, or the synthetic samples), reads each run's metrics.json and prints, per
metric, mean ± standard deviation, min, max and N; the noise bands a gap must clear; and one row per seed.

- `--data model` (default): SmolLM2-135M block 15 on the Wikipedia sample, offline. Every seed trains from one
  activation cache (`train.cache_dir`, harvested by the first seed; see README "Activation cache"), with
  `do_analyze=false wandb.mode=disabled`. Metrics: FVU, L0, dead fraction, delta CE, KL, loss recovered.
- `--data synthetic`: `train.py data=synthetic` (conf/data/synthetic.yaml): MCC, F1, precision, recall,
  uniqueness, splitting and absorption against the true dictionary, EV, FVU, L0, dead fraction. The
  dictionary is seeded by `synthetic.seed`, which stays fixed: only the SAE and its samples change.
- `--absorption` runs `python -m sae.absorption RUN_DIR` on each seed's run; any `absorption_*` keys it
  writes into metrics.json are reported like the rest.

Runs land in `--out` (default runs/seeds/<data>-<overrides>); running the same command again reuses the
finished seeds (train.py's `resume=true`) and continues an interrupted one. `--compare DIR` also prints each
metric's gap to the seeds of another such directory, with the gap's standard error.
"""

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL_METRICS = (
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "delta_ce",
    "kl_spliced",
    "loss_recovered",
)
SYNTHETIC_METRICS = (
    "gt_mcc",
    "gt_f1",
    "gt_precision",
    "gt_recall",
    "gt_uniqueness",
    "gt_splitting",
    "gt_absorption",
    "explained_variance",
    "fvu",
    "l0",
    "dead_fraction",
)
"""The metrics.json keys reported, in this order; `absorption_*` keys follow, whatever their names."""
OURS = ("train.seed", "run_dir", "resume", "overwrite")
"""Overrides this script sets per seed, refused from the user."""


def override_key(override: str) -> str:
    """`train.tokens` of `train.tokens=1e6`, `sae` of `sae=matryoshka` (leading `+`/`~` dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def slug(text: str) -> str:
    """`text` as one file name Hydra reads back as a plain value: characters outside [A-Za-z0-9._-] (`=` and
    `,` among them) become `_`, at most 80 kept."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80]


def base_overrides(data: str, overrides: list[str], out: Path) -> list[str]:
    """The user's overrides with this bench's defaults for those keys the user left alone."""
    given = {override_key(o) for o in overrides}
    bad = sorted(given & set(OURS))
    if bad or "-m" in overrides or "--multirun" in overrides:
        sys.exit(
            f"bench/seeds.py sets {', '.join(OURS)} per seed and runs one job at a time; drop {bad or '-m'}"
        )
    defaults = {"wandb.mode": "disabled", "do_analyze": "false"}
    if data == "synthetic":
        defaults = {"data": "synthetic"} | defaults
    else:
        # One harvest for all seeds: the cache is keyed by what it depends on (model, data, harvest size).
        harvest = [o for o in overrides if override_key(o).split(".")[0] in ("model", "data")]
        harvest += [o for o in overrides if override_key(o) == "train.harvest_tokens"]
        defaults["train.cache_dir"] = str(out.parent / f"cache-{slug('-'.join(harvest) or 'default')}")
    return [f"{k}={v}" for k, v in defaults.items() if k not in given] + overrides


def train_seed(overrides: list[str], seed: int, run_dir: Path) -> float:
    """Runs train.py for `seed` into `run_dir` (reusing a finished run of the same settings); returns the
    wall seconds. Its output goes to `run_dir`.log; on failure, its tail is shown."""
    cmd = [sys.executable, "train.py", *overrides, f"train.seed={seed}", f"run_dir={run_dir}", "resume=true"]
    log = run_dir.with_suffix(".log")
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"{tail}\ntrain.py failed for seed {seed} (exit {done.returncode}); its output: {log}")
    return time.perf_counter() - start


def absorption(run_dir: Path) -> None:
    """Adds `absorption_*` keys to run_dir/metrics.json (`python -m sae.absorption RUN_DIR`)."""
    cmd = [sys.executable, "-m", "sae.absorption", str(run_dir)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    with run_dir.with_suffix(".absorption.log").open("w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"sae.absorption failed on {run_dir}; its output: {f.name}")


def read_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """The numeric metrics of each SAE in run_dir/metrics.json: {"": metrics} for one SAE, {name: metrics}
    for a `saes` list."""
    found = json.loads((run_dir / "metrics.json").read_text())
    nested = {k: v for k, v in found.items() if isinstance(v, dict)}
    runs = nested or {"": found}
    return {
        name: {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, m in runs.items()
    }


def _flat(run_dir: Path) -> set[str]:
    """Every metric key of run_dir/metrics.json, whichever SAE it belongs to."""
    return {k for m in read_metrics(run_dir).values() for k in m}


def stats(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation (n - 1; 0 for one value), min and max."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var), min(values), max(values)


def reported(keys: tuple[str, ...], seeds: dict[int, dict[str, float]]) -> list[str]:
    """The keys of `keys` every seed has, then every seed's `absorption_*` keys (sorted)."""
    common = set.intersection(*(set(m) for m in seeds.values()))
    return [k for k in keys if k in common] + sorted(k for k in common if k.startswith("absorption_"))


def tables(keys: list[str], seeds: dict[int, dict[str, float]], walls: dict[int, float]) -> str:
    """The summary, the noise bands and the per-seed rows, as markdown."""
    n = len(seeds)
    out = ["| metric | mean ± std | min | max | N |", "|---|---|---|---|---|"]
    for k in keys:
        mean, std, lo, hi = stats([m[k] for m in seeds.values()])
        out.append(f"| {k} | {mean:.4g} ± {std:.2g} | {lo:.4g} | {hi:.4g} | {n} |")
    out += [
        "",
        f"| metric | std | std / mean | 2σ band | gap of two single runs beyond noise (2√2σ) | "
        f"gap of two {n}-seed means (2σ√(2/{n})) |",
        "|---|---|---|---|---|---|",
    ]
    for k in keys:
        mean, std, _, _ = stats([m[k] for m in seeds.values()])
        rel = f"{std / abs(mean):.1%}" if mean else "-"
        band = f"[{mean - 2 * std:.4g}, {mean + 2 * std:.4g}]"
        out.append(
            f"| {k} | {std:.3g} | {rel} | {band} | {2 * math.sqrt(2) * std:.3g} | {2 * std * math.sqrt(2 / n):.3g} |"
        )
    out += [
        "",
        "| seed | " + " | ".join(keys) + " | train.py s (this call) | wall_seconds (metrics.json) |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for seed, m in seeds.items():
        cells = [f"{m[k]:.4g}" for k in keys] + [
            f"{walls[seed]:.0f}",
            f"{m.get('wall_seconds', math.nan):.0f}",
        ]
        out.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def comparison(keys: list[str], ours: dict[int, dict[str, float]], other: dict[int, dict[str, float]]) -> str:
    """Each metric's gap (this set minus `other`), its standard error (Welch) and the gap in those units."""
    out = ["| metric | this | other | gap | s.e. | gap / s.e. |", "|---|---|---|---|---|---|"]
    for k in keys:
        if not all(k in m for m in other.values()):
            continue
        (ma, sa, _, _), (mb, sb, _, _) = (
            stats([m[k] for m in ours.values()]),
            stats([m[k] for m in other.values()]),
        )
        se = math.sqrt(sa**2 / len(ours) + sb**2 / len(other))
        ratio = f"{(ma - mb) / se:.1f}" if se else "-"
        out.append(f"| {k} | {ma:.4g} | {mb:.4g} | {ma - mb:+.4g} | {se:.2g} | {ratio} |")
    return "\n".join(out)


def finished_seeds(out: Path) -> dict[int, dict[str, dict[str, float]]]:
    """The metrics of every finished `seed-S` run in `out`, by seed."""
    runs = sorted(out.glob("seed-*/metrics.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return {int(p.parent.name.split("-")[1]): read_metrics(p.parent) for p in runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1"
    )
    parser.add_argument("--data", choices=("model", "synthetic"), default="model")
    parser.add_argument("--absorption", action="store_true", help="run python -m sae.absorption on each seed")
    parser.add_argument("--out", type=Path, help="directory of the seed runs (default runs/seeds/<config>)")
    parser.add_argument("--compare", type=Path, help="another --out directory: print the gaps to its seeds")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py, after --")
    args = parser.parse_args()
    if "data=synthetic" in args.overrides:
        args.data = "synthetic"
    if args.seeds < 1:
        sys.exit(f"--seeds={args.seeds} must be >= 1 (2 or more for a standard deviation)")
    if args.absorption and importlib.util.find_spec("sae.absorption") is None:
        sys.exit("--absorption runs `python -m sae.absorption RUN_DIR`, but sae/absorption.py is not here")
    if args.compare and not list(args.compare.glob("seed-*/metrics.json")):
        sys.exit(f"--compare {args.compare}: no finished seed-*/metrics.json in it")
    out = (args.out or ROOT / "runs" / "seeds" / slug("-".join([args.data, *args.overrides]))).resolve()
    overrides = base_overrides(args.data, args.overrides, out)
    out.mkdir(parents=True, exist_ok=True)

    walls: dict[int, float] = {}
    results: dict[int, dict[str, dict[str, float]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_dir = out / f"seed-{seed}"
        walls[seed] = train_seed(overrides, seed, run_dir)
        if args.absorption and not any(k.startswith("absorption_") for k in _flat(run_dir)):
            absorption(run_dir)
        results[seed] = read_metrics(run_dir)
        print(f"seed {seed}: {walls[seed]:.0f} s, {run_dir}", flush=True)

    keys = MODEL_METRICS if args.data == "model" else SYNTHETIC_METRICS
    print(f"\n## {args.seeds} seeds of `python train.py {' '.join(overrides)}`\n")
    other = finished_seeds(args.compare) if args.compare else {}
    for name in results[args.first_seed]:
        per_seed = {seed: r[name] for seed, r in results.items()}
        shown = reported(keys, per_seed)
        print((f"### {name}\n\n" if name else "") + tables(shown, per_seed, walls) + "\n")
        if other:
            print(f"Gaps to {args.compare} ({len(other)} seeds):\n")
            print(comparison(shown, per_seed, {s: r[name] for s, r in other.items() if name in r}) + "\n")
    if not args.absorption and args.data == "model":
        print("absorption on the model: not run (pass --absorption to run python -m sae.absorption per seed)")
    print(f"runs: {out}; total {sum(walls.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
