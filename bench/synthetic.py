"""Ground-truth recovery on synthetic activations: every architecture of ours at a matched L0, against SAELens'
own trainers on the very same samples, next to the published SynthSAEBench-16k figures.

    python bench/synthetic.py                                     # small: 1024 features in 128 dims, width 256
    python bench/synthetic.py --config 16k --tokens 2000000       # SynthSAEBench-16k's world, width 4096, k 25
    python bench/synthetic.py --archs matryoshka,batchtopk --no-peer --tokens 4000000

The data is `sae.synthetic` (after SynthSAEBench, Chanin & Garriga-Alonso 2026, arXiv 2602.14687). Our SAEs
train with `sae.train.train` and our defaults (learning rate from the width, warm-up and decay). Where SAELens
is importable (it lives in a venv of its own: run this script with that venv's python; our package is found
from this checkout), its training SAEs train with its synthetic toolkit's own loop, `train_toy_sae`, at its
defaults (lr 3e-4 constant, batch 1024, no warm-up or decay), on our samples: our dictionary is handed to it
as a `FeatureDictionary` and our sampler as its activation generator, batch b of both drawn from
`seeded(seed, 2b)`, so both see the same floats. TopK-family SAEs run at k = the target L0; JumpReLU and
ReLU-L1 at a sparsity coefficient found (per trainer) to land near it (`--search` re-finds it).

Every SAE, ours and theirs, is scored by our `ground_truth` and by SAELens' `eval_sae_on_synthetic_data` on
the same evaluation samples (the stream's odd batches), so the second table shows whether the two metric
codes agree.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # our package, from SAELens' venv too
os.environ.setdefault("TQDM_DISABLE", "1")  # both trainers' progress bars; the bench prints one line per SAE

from sae.config import SAEConfig, SyntheticConfig, TrainConfig  # noqa: E402
from sae.model import sparse  # noqa: E402
from sae.synthetic import Features, Samples, ground_truth, seeded  # noqa: E402
from sae.train import train  # noqa: E402

try:
    import sae_lens
    from sae_lens.synthetic import FeatureDictionary, eval_sae_on_synthetic_data, train_toy_sae
except ImportError:  # ours only
    sae_lens = None

ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")
PEER_NAME = {
    "topk": "TopK",
    "batchtopk": "BatchTopK",
    "matryoshka": "MatryoshkaBatchTopK",
    "jumprelu": "JumpReLU",
    "relu": "Standard",
}
PUBLISHED = {  # SynthSAEBench-16k (arXiv 2602.14687): L0 25, width 4096, 200M samples: F1, MCC, uniq, EV
    "batchtopk": (0.7316, 0.7574, 0.9837, 0.7923),
    "matryoshka": (0.8793, 0.7927, 0.9987, 0.7792),
    "jumprelu": (0.7317, 0.7527, 0.9885, 0.7951),
    "relu": (0.5562, 0.6039, 0.8976, 0.7654),
}


@dataclass
class Setup:
    """One benchmark world: the dictionary, the SAE width, the target L0 and the run sizes."""

    synthetic: SyntheticConfig
    d_sae: int
    k: int
    tokens: int
    eval_samples: int
    coefs: dict[str, float] = field(default_factory=dict)
    """Sparsity coefficients landing near L0 = k: `jumprelu`/`relu` ours (FVU units), `peer-...` SAELens'."""


SETUPS = {
    "small": Setup(
        SyntheticConfig(n_features=1024, d_in=128, hierarchy_roots=8),
        d_sae=256,
        k=8,
        tokens=200_000,
        eval_samples=20_480,
        coefs={"jumprelu": 0.0135, "relu": 0.1, "peer-jumprelu": 23.0, "peer-relu": 22.0},
    ),
    "16k": Setup(  # SynthSAEBench-16k
        SyntheticConfig(
            n_features=16384,
            d_in=768,
            zipf_exponent=0.5,
            p_max=0.4,
            p_min=5e-4,
            magnitude_start=5.0,
            magnitude_end=4.0,
            magnitude_std=0.5,
            hierarchy_roots=128,
            hierarchy_branching=4,
            hierarchy_depth=3,
            mutually_exclusive=True,
            scale_children=True,
            correlation_rank=25,
            correlation_scale=0.1,
            bias_norm=0.5,
        ),
        d_sae=4096,
        k=25,
        tokens=65_536,
        eval_samples=20_480,
        coefs={"jumprelu": 0.05, "relu": 0.03, "peer-jumprelu": 1.0, "peer-relu": 22.0},
    ),
}


class Memo(Features):
    """`features` whose samples are drawn once and kept, by (generator seed, n): every SAE, ours and theirs,
    trains and is evaluated on the same batches without drawing them again (drawing a batch of the 16k world
    costs as much as several training steps on CPU). Keeps x [n, D] dense and a [n, N] as CSR."""

    def __init__(self, features: Features):
        super().__init__(features.cfg, features.tensors())
        self.memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._overlap: float | None = None

    def to(self, device: str | torch.device) -> "Memo":
        return self  # CPU only

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        key = (g.initial_seed(), n)
        if key not in self.memo:
            x, a = super().sample(n, g)
            self.memo[key] = (x, a.to_sparse_csr())
        x, a = self.memo[key]
        return x.clone(), a.to_dense()

    def overlap(self, chunk: int = 2048) -> float:
        if self._overlap is None:
            self._overlap = super().overlap(chunk)
        return self._overlap


# --- SAELens' view of our data and of our SAEs ----------------------------------------------------------


class _Generator(torch.nn.Module):
    """Our sampler as a SAELens `ActivationGenerator`: call b returns the true activations a [n, N] of our
    stream's batch b (`seeded(seed, 2b + parity)`: parity 0 trains, 1 evaluates) and leaves the x [n, D]
    drawn with them on `dictionary`, which hands exactly those floats on."""

    def __init__(self, features: Features, dictionary: "FeatureDictionary", seed: int, parity: int):
        super().__init__()
        self.features, self.dictionary, self.seed, self.parity, self.batch = (
            features,
            dictionary,
            seed,
            parity,
            0,
        )

    def sample(self, n: int) -> torch.Tensor:
        x, a = self.features.sample(
            n, seeded(self.seed, 2 * self.batch + self.parity, x_device(self.features))
        )
        self.batch += 1
        self.dictionary.last = (a, x)
        return a

    def forward(self, n: int) -> torch.Tensor:
        return self.sample(n)


def draw(features: Memo, tokens: int, samples: int, seed: int) -> None:
    """Draws every training and evaluation batch into the memo up front, in the batch sizes the trainers and
    both evaluations will ask for."""
    cpu = torch.device("cpu")
    for b in range(math.ceil(tokens / 1024)):
        features.sample(1024, seeded(seed, 2 * b, cpu))
    for b in range(math.ceil(samples / 1024)):
        features.sample(min(1024, samples - 1024 * b), seeded(seed, 2 * b + 1, cpu))


def x_device(features: Features) -> torch.device:
    return features.directions.device


def peer_dictionary(features: Features) -> "FeatureDictionary":
    """Our dictionary as a SAELens `FeatureDictionary` (our directions and bias). Its forward returns the x
    our sampler drew with a when given that very a (same floats, same cost); else a @ directions + bias."""

    class Dictionary(FeatureDictionary):
        last: tuple[torch.Tensor, torch.Tensor] | None = None

        def forward(self, a: torch.Tensor) -> torch.Tensor:
            if self.last is not None and a is self.last[0]:
                return self.last[1]
            return super().forward(a)

    d = Dictionary(features.cfg.n_features, features.cfg.d_in, bias=False, initializer=None)
    d.feature_vectors.data = features.directions.clone()
    d.bias = torch.nn.Parameter(features.bias.clone(), requires_grad=False)
    return d


class _OursForPeer(torch.nn.Module):
    """Our SAE as SAELens' evaluation sees an SAE: dense latents [B, F] in, out."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    @property
    def W_dec(self) -> torch.Tensor:
        return self.sae.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.dense(self.sae.encode(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.sae.W_dec + self.sae.b_dec


class _PeerForOurs:
    """A SAELens SAE as our `ground_truth` sees an SAE: a sparse `Code` in, out."""

    def __init__(self, sae):
        self.sae, self.W_dec, self.d_sae = sae, sae.W_dec, sae.cfg.d_sae

    def encode(self, x: torch.Tensor):
        return sparse(self.sae.encode(x))

    def decode(self, code) -> torch.Tensor:
        z = torch.zeros(code.acts.shape[0], self.d_sae, dtype=code.acts.dtype, device=code.acts.device)
        return self.sae.decode(z.scatter_(1, code.idx, code.acts))


# --- training -------------------------------------------------------------------------------------------


def prefix_widths(d_sae: int) -> list[int]:
    """Our default Matryoshka prefixes in latents, for SAELens' `matryoshka_widths` too."""
    return [round(p * d_sae) for p in SAEConfig().prefixes]


def train_ours(arch: str, setup: Setup, features: Features, tokens: int, seed: int, coef: float | None):
    sae_cfg = SAEConfig(arch=arch, d_sae=setup.d_sae, k=setup.k, sparsity_coef=coef)
    cfg = TrainConfig(
        tokens=tokens, batch_size=1024, log_every=10**9, eval_every=0, checkpoint_every=0, seed=seed
    )
    return train(sae_cfg, cfg, Samples(features, 1024, tokens, seed))


def train_peer(arch: str, setup: Setup, features: Features, tokens: int, seed: int, coef: float | None):
    """SAELens' training SAE of `arch`, trained by `train_toy_sae` at its defaults on our stream."""
    common = {"d_in": features.cfg.d_in, "d_sae": setup.d_sae}
    cfgs = {
        "topk": lambda: sae_lens.TopKTrainingSAEConfig(k=setup.k, **common),
        "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(k=setup.k, **common),
        "matryoshka": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            k=setup.k, matryoshka_widths=prefix_widths(setup.d_sae), **common
        ),
        "jumprelu": lambda: sae_lens.JumpReLUTrainingSAEConfig(l0_coefficient=coef, **common),
        "relu": lambda: sae_lens.StandardTrainingSAEConfig(l1_coefficient=coef, **common),
    }
    classes = {
        "topk": sae_lens.TopKTrainingSAE,
        "batchtopk": sae_lens.BatchTopKTrainingSAE,
        "matryoshka": sae_lens.MatryoshkaBatchTopKTrainingSAE,
        "jumprelu": sae_lens.JumpReLUTrainingSAE,
        "relu": sae_lens.StandardTrainingSAE,
    }
    torch.manual_seed(seed)
    sae = classes[arch](cfgs[arch]())
    dictionary = peer_dictionary(features)
    train_toy_sae(
        sae, dictionary, _Generator(features, dictionary, seed, 0), training_samples=tokens, batch_size=1024
    )
    return sae


def train_timed(who: str, arch: str, setup: Setup, features: Features, tokens: int, seed: int, coef):
    start = time.perf_counter()
    sae = (train_ours if who == "ours" else train_peer)(arch, setup, features, tokens, seed, coef)
    return sae, time.perf_counter() - start


# --- evaluation -----------------------------------------------------------------------------------------


def evaluate(who: str, sae, features: Features, samples: int, seed: int) -> dict:
    """Our `ground_truth` and, where installed, SAELens' evaluation, on the same evaluation samples."""
    ours_view = sae if who == "ours" else _PeerForOurs(sae)
    out = {"ours": ground_truth(ours_view, features, samples, 1024, seed)}
    if sae_lens is not None:
        peer_view = _OursForPeer(sae) if who == "ours" else sae
        dictionary = peer_dictionary(features)
        gen = _Generator(features, dictionary, seed, 1)
        with torch.no_grad():
            r = eval_sae_on_synthetic_data(peer_view, dictionary, gen, num_samples=samples, batch_size=1024)
        out["peer"] = {
            "mcc": r.mcc,
            "f1": r.classification.f1_score,
            "uniqueness": r.uniqueness,
            "explained_variance": r.explained_variance,
            "l0": r.sae_l0,
            "dead": r.dead_latents,
            "true_l0": r.true_l0,
        }
    return out


def quick_l0(who: str, sae, features: Features, seed: int, n: int = 8192) -> float:
    x, _ = features.sample(n, seeded(seed, 1, x_device(features)))
    with torch.no_grad():
        if who == "ours":
            return float((sae.encode(x).acts > 0).float().sum(dim=1).mean())
        return float((sae.encode(x) != 0).float().sum(dim=1).mean())


def search(
    who: str, arch: str, setup: Setup, features: Features, tokens: int, seed: int, c: float, tries: int
):
    """The sparsity coefficient that lands nearest L0 = k after `tokens` in `tries` runs, secant steps on
    log L0 against log c (a slope of -1 to start); returns (coefficient, its SAE, its training seconds)."""
    print(f"searching {who} {arch}'s coefficient on {tokens:,} samples for L0 {setup.k}:", flush=True)
    seen: list[tuple[float, float, object, float]] = []
    for _ in range(tries):
        sae, seconds = train_timed(who, arch, setup, features, tokens, seed, c)
        l0 = quick_l0(who, sae, features, seed)
        print(f"  coef {c:.4g}: L0 {l0:.1f} ({seconds:.0f} s)", flush=True)
        seen.append((c, l0, sae, seconds))
        if abs(math.log(max(l0, 1e-3) / setup.k)) < 0.05:
            break
        slope = -1.0
        if len(seen) >= 2 and seen[-1][1] > 0 and seen[-2][1] > 0 and seen[-1][0] != seen[-2][0]:
            (c0, l0a, *_), (c1, l0b, *_) = seen[-2], seen[-1]
            s = (math.log(l0b) - math.log(l0a)) / (math.log(c1) - math.log(c0))
            slope = min(-0.2, max(-5.0, s))
        c = c * math.exp(math.log(setup.k / max(l0, 1e-3)) / slope)
    best = min(seen, key=lambda t: abs(math.log(max(t[1], 1e-3) / setup.k)))
    return best[0], best[2], best[3]


# --- report ---------------------------------------------------------------------------------------------


def results_table(rows: list[dict], setup: Setup, tokens: int) -> str:
    head = (
        "| SAE | trainer | samples | L0 | F1 | MCC | uniq | EV (1-FVU) | EV uncentered | dead | absorption | "
        "train s | samples/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        m = r["metrics"]["ours"]
        lines.append(
            f"| {r['arch']} | {r['who']} | {tokens:,} | {m['l0']:.1f} | {m['gt_f1']:.4f} | "
            f"{m['gt_mcc']:.4f} | {m['gt_uniqueness']:.4f} | {1 - m['fvu']:.4f} | "
            f"{m['explained_variance']:.4f} | {m['dead_fraction']:.3f} | {m['gt_absorption']:.3f} | "
            f"{r['seconds']:.0f} | {tokens / r['seconds']:,.0f} |"
        )
    if setup is SETUPS["16k"]:
        for arch, (f1, mcc, uniq, ev) in PUBLISHED.items():
            name = PEER_NAME[arch] + (" L1" if arch == "relu" else "")
            lines.append(
                f"| {arch} | published ({name}) | 200,000,000 | 25 | {f1:.4f} | {mcc:.4f} | {uniq:.4f} | {ev:.4f} "
                "| | | | | |"
            )
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    pairs = [
        ("MCC", "gt_mcc", "mcc"),
        ("F1", "gt_f1", "f1"),
        ("uniq", "gt_uniqueness", "uniqueness"),
        ("L0", "l0", "l0"),
    ]
    head = "| SAE | trainer | " + " | ".join(f"{p[0]} ours / SAELens" for p in pairs)
    head += " | 1-FVU / SAELens EV | uncentered EV | dead ours / SAELens | true L0 ours / SAELens |"
    lines = [head, "|" + "---|" * (len(pairs) + 6)]
    for r in rows:
        o, p = r["metrics"]["ours"], r["metrics"]["peer"]
        cells = [f"{o[a]:.4f} / {p[b]:.4f}" for _, a, b in pairs]
        cells.append(f"{1 - o['fvu']:.4f} / {p['explained_variance']:.4f}")
        cells.append(f"{o['explained_variance']:.4f}")
        cells.append(f"{round(o['dead_fraction'] * r['d_sae'])} / {p['dead']}")
        cells.append(f"{o['gt_l0']:.2f} / {p['true_l0']:.2f}")
        lines.append(f"| {r['arch']} | {r['who']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(SETUPS), default="small")
    parser.add_argument("--tokens", type=int, help="training samples for every SAE (default: the config's)")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, of " + ",".join(ARCHS))
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="SAELens too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, help="evaluation samples (default: the config's)")
    parser.add_argument(
        "--coefs", default="", help="override sparsity coefficients: jumprelu=2e-3,peer-relu=5,..."
    )
    parser.add_argument(
        "--search", type=int, default=0, help="re-find each coefficient in this many short runs"
    )
    parser.add_argument(
        "--search-tokens",
        type=int,
        help="samples per search run (default: --tokens, and the best run is kept)",
    )
    args = parser.parse_args()

    setup = SETUPS[args.config]
    tokens = args.tokens or setup.tokens
    samples = args.eval_samples or setup.eval_samples
    archs = [a for a in args.archs.split(",") if a]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        parser.error(f"--archs {bad} not among {ARCHS}")
    coefs = dict(setup.coefs)
    for item in filter(None, args.coefs.split(",")):
        key, value = item.split("=")
        coefs[key] = float(value)
    whos = ["ours"]
    if args.peer and sae_lens is None:
        print("sae_lens is not importable here: ours only (run with SAELens' venv's python for the peer)\n")
    elif args.peer:
        whos.append("SAELens")

    command = "python bench/synthetic.py " + " ".join(sys.argv[1:])
    print(f"$ {command}")
    print(
        f"torch {torch.__version__}, SAELens {getattr(sae_lens, '__version__', 'absent')}, {torch.get_num_threads()} threads"
    )
    start_all = time.perf_counter()
    features = Memo(Features.make(setup.synthetic))
    s = setup.synthetic
    print(
        f"world: {s.n_features} features in {s.d_in} dims, hierarchy {s.hierarchy_roots} roots x "
        f"{s.hierarchy_branching}^{s.hierarchy_depth}; SAE width {setup.d_sae}, target L0 {setup.k}; "
        f"{tokens:,} training samples, batch 1024; {samples:,} evaluation samples"
    )
    drawn = time.perf_counter()
    draw(features, tokens, samples, args.seed)
    print(f"drew them in {time.perf_counter() - drawn:.0f} s, once: no SAE's training time includes it")

    search_tokens = args.search_tokens or tokens
    trained = {}  # (who, arch): (SAE, seconds) of a search run at the full length, kept
    for who in whos:
        for arch in ("jumprelu", "relu"):
            key = arch if who == "ours" else f"peer-{arch}"
            if arch in archs and args.search:
                coefs[key], sae, seconds = search(
                    who, arch, setup, features, search_tokens, args.seed, coefs[key], args.search
                )
                if search_tokens == tokens:
                    trained[who, arch] = (sae, seconds)
    print("sparsity coefficients:", ", ".join(f"{k}={v:.4g}" for k, v in coefs.items()), flush=True)

    rows = []
    for arch in archs:
        for who in whos:
            key = arch if who == "ours" else f"peer-{arch}"
            sae, seconds = trained.pop((who, arch), None) or train_timed(
                who, arch, setup, features, tokens, args.seed, coefs.get(key)
            )
            metrics = evaluate(who, sae, features, samples, args.seed)
            rows.append(
                {"arch": arch, "who": who, "seconds": seconds, "metrics": metrics, "d_sae": setup.d_sae}
            )
            m = metrics["ours"]
            print(
                f"{arch:>10} {who:>7}: {seconds:6.0f} s  L0 {m['l0']:5.1f}  F1 {m['gt_f1']:.4f}  "
                f"MCC {m['gt_mcc']:.4f}  uniq {m['gt_uniqueness']:.4f}  1-FVU {1 - m['fvu']:.4f}  "
                f"dead {m['dead_fraction']:.3f}",
                flush=True,
            )

    truth = rows[0]["metrics"]["ours"]
    print(f"\n## SynthSAEBench ({args.config}): ground truth at L0 {setup.k}\n")
    print(
        f"`{command}` ({tokens:,} training samples per SAE, {samples:,} evaluation samples; metrics by our code)\n"
    )
    print(results_table(rows, setup, tokens))
    print(
        f"\nThe dictionary is not orthogonalised (`orthogonalize_steps=0`): mean max |cos| between true features "
        f"`gt_overlap` = {truth['gt_overlap']:.4f}. Our hierarchy compensates a child's firing probability for "
        f"its parent's gate but not for mutual exclusion, so the true L0 is `gt_l0` = {truth['gt_l0']:.2f} "
        "(SynthSAEBench-16k's is about 34). EV (1-FVU) is centered, as SAELens' synthetic evaluation and "
        "the published figures compute it; `explained_variance` as our metrics define it is uncentered. "
        "Our SAEs: our defaults (lr from the width, warm-up, decay); SAELens': `train_toy_sae`, lr 3e-4 "
        "constant, batch 1024, its defaults otherwise; Matryoshka prefixes "
        f"{prefix_widths(setup.d_sae)} for both; coefficients "
        + ", ".join(f"{k}={v:.4g}" for k, v in coefs.items() if k.replace("peer-", "") in archs)
        + ". BatchTopK-family SAELens SAEs are evaluated as its runner does (the training SAE, "
        "BatchTopK over each evaluation batch of 1024); ours with our inference threshold."
    )
    if sae_lens is not None:
        print("\n### The same SAEs under our `ground_truth` and SAELens' `eval_sae_on_synthetic_data`\n")
        print(agreement_table(rows))
    print(f"\nwall time {time.perf_counter() - start_all:.0f} s")


if __name__ == "__main__":
    main()
