"""Size and build speed of the dashboard site (`sae.site.build_site`) at SAE widths from the demo's to 65,536.

    python bench/site.py                              # F = 4,608 and 65,536
    python bench/site.py --features 16384 131072
    python bench/site.py --features 4608 --keep /tmp/site-bench    # keep the run directories to open the sites

The activations are SYNTHETIC, for measuring size and speed only: random sparse codes (K latents per token,
each feature's firing rate and activation scale drawn log-uniformly, 2% of features dead) on a fake corpus of
random words, folded into `sae.analyze.FeatureStats` with the default `AnalyzeConfig` (10 top examples and
10 bands of 4 samples a feature, windows of 17 tokens) and written by `sae.analyze.save_analysis`, the code
path of a real analysis, with random logit-lens tokens and nearest features. The tokenizer is a tiny word-level
one over the commonest words of the Wikipedia sample, so tokens are a few characters long as a real BPE
vocabulary's are. The corpus is sized so that a feature fires `--firings` times on average, enough to fill most
features' top examples and bands, whatever F. A real feature often fires on the neighbours of its activating
token too, which random codes seldom do, so a real analysis's windows hold more non-zero activations and its
files are somewhat larger.

Each width's site is built in a fresh process, so its peak RSS (which includes the imports of `sae`, torch
among them) is the build's own. Printed per width: files, total size (bytes, and disk use in blocks), size per
feature, build time in all and per feature, the size of index.html and of everything it loads before it
shows the list (its scripts and style sheets), the most a feature page loads to show its feature (the page, its
scripts and style sheet, the largest chunk of features' data), and the build's peak RSS.
"""

import argparse
import collections
import json
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sae.analyze import FeatureStats, save_analysis  # noqa: E402
from sae.config import AnalyzeConfig  # noqa: E402
from sae.data import Contexts, wikipedia_sample  # noqa: E402
from sae.model import Code  # noqa: E402

T = 64  # positions per fake context, BOS first
CONTEXTS_PER_BATCH = 32
VOCAB = 4096


def word_tokenizer(n: int = VOCAB):
    """A word-level tokenizer over the `n` commonest words (with their leading space), punctuation marks and
    newlines of the Wikipedia sample, plus BOS and EOS: tokens as long as a real vocabulary's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = collections.Counter()
    for line in wikipedia_sample().read_text(encoding="utf-8").splitlines()[:2000]:
        words.update(re.findall(r" ?[A-Za-z]{1,12}|[0-9]{1,4}|[^\sA-Za-z0-9]|\n", json.loads(line)["text"]))
    vocab = {"<bos>": 0, "<eos>": 1} | {w: i + 2 for i, (w, _) in enumerate(words.most_common(n - 2))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def synthetic_analysis(run_dir: Path, F: int, k: int, firings: int, seed: int = 0) -> int:
    """Writes `run_dir/analysis/` for F features from random sparse codes (see the module docstring); returns
    the number of tokens analysed."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = word_tokenizer()
    V = len(tokenizer)
    cfg = AnalyzeConfig(tokens=1)
    stats = FeatureStats(F, cfg)
    rate = 10 ** (2 * torch.rand(F, generator=g) - 1)  # [F] relative firing rates, 0.1 .. 10
    rate[torch.randperm(F, generator=g)[: F // 50]] = 0  # dead
    scale = 10 ** (torch.rand(F, generator=g) + 0.3)  # [F] activation scales, 2 .. 20
    word_p = 1 / torch.arange(1, V - 1, dtype=torch.float64)  # Zipf over the words, no BOS/EOS
    n_contexts = math.ceil(F * firings / (k * (T - 1)) / CONTEXTS_PER_BATCH) * CONTEXTS_PER_BATCH
    for b in range(n_contexts // CONTEXTS_PER_BATCH):
        N = CONTEXTS_PER_BATCH
        ids = torch.multinomial(word_p, N * T, replacement=True, generator=g).view(N, T) + 2
        ids[:, 0] = 0
        mask = ids > 1
        row = torch.where(mask, b * N + torch.arange(N)[:, None], -1)
        pos = torch.where(mask, torch.arange(T) - 1, -1)
        B = int(mask.sum())
        idx = torch.multinomial(rate, B * k, replacement=True, generator=g).view(B, k).sort(dim=1).values
        acts = scale[idx] * torch.empty(B, k).exponential_(generator=g)  # [B, K]
        acts[:, 1:][idx[:, 1:] == idx[:, :-1]] = 0  # a latent drawn twice for a token: padding
        stats.update(Code(acts, idx), mask, Contexts(ids=ids, row=row, pos=pos, mask=mask))
    n = cfg.logit_k
    lens = (
        torch.rand(F, n, generator=g).sort(dim=1, descending=True).values * 2,
        torch.randint(2, V, (F, n), generator=g),
        -torch.rand(F, n, generator=g).sort(dim=1, descending=True).values * 2,
        torch.randint(2, V, (F, n), generator=g),
    )
    near = (
        torch.rand(F, cfg.nearest, generator=g).sort(dim=1, descending=True).values,
        torch.randint(0, F, (F, cfg.nearest), generator=g),
    )
    meta = {"model": "synthetic", "hook": "synthetic", "arch": "topk", "d_in": 576, "d_sae": F, "k": k}
    save_analysis(stats, run_dir, tokenizer, meta, lens, near)
    return stats.tokens


def _loaded_by(page: Path) -> int:
    """Bytes of the HTML page `page` and of the scripts and style sheets it loads."""
    refs = re.findall(
        r'<script [^>]*src="([^"]+)"|<link [^>]*href="([^"]+)"', page.read_text(encoding="utf-8")
    )
    return sum(p.stat().st_size for p in [page, *(page.parent / (src or href) for src, href in refs)])


def build(run_dir: Path) -> dict:
    """Builds `run_dir`'s site in this process: the figures of one row of the table."""
    from sae import site

    start = time.perf_counter()
    index = site.build_site(run_dir)
    seconds = time.perf_counter() - start
    files = [p for p in index.parent.rglob("*") if p.is_file()]
    return {
        "seconds": seconds,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "disk": sum(p.stat().st_blocks * 512 for p in files),
        "index": index.stat().st_size,
        "index_load": _loaded_by(index),
        # A feature page loads the chunk of its feature too: the largest, to count the most it loads.
        "page_load": _loaded_by(index.parent / "feature.html")
        + max(p.stat().st_size for p in index.parent.glob("data/features-*.js")),
        "rss": _peak_rss(),
    }


def _peak_rss() -> int:
    """This process's peak resident set size in bytes: Linux's VmHWM, which starts afresh at exec, unlike
    ru_maxrss, which a child takes over from the parent it was forked from (here the one that ran the
    analysis)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, nargs="+", default=[4608, 65536], help="widths F to build")
    parser.add_argument("--k", type=int, default=32, help="latents per token of the synthetic codes")
    parser.add_argument("--firings", type=int, default=100, help="mean tokens a feature fires on")
    parser.add_argument("--keep", type=Path, help="keep the run directories under this directory")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child process of one width
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(args.build)))
        return
    print("SYNTHETIC activations (random sparse codes): figures of size and speed only, not of features")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for F in args.features:
            run_dir = (args.keep or Path(tmp)) / f"site-{F}"
            start = time.perf_counter()
            tokens = synthetic_analysis(run_dir, F, args.k, args.firings)
            json_mb = (run_dir / "analysis" / "features.json").stat().st_size / 1e6
            print(
                f"F={F:,}: analysis of {tokens:,} synthetic tokens, features.json {json_mb:.0f} MB, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            cmd = [sys.executable, __file__, "--build", str(run_dir)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append((F, json.loads(out.splitlines()[-1])))
    head = ("F", "files", "site MB", "disk MB", "KB/feat", "build s", "ms/feat", "index KB", "index+load KB",
            "page+load KB", "peak RSS MB")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    for F, r in rows:
        cells = [f"{F:,}", f"{r['files']:,}", f"{r['bytes'] / 1e6:,.0f}", f"{r['disk'] / 1e6:,.0f}",
                 f"{r['bytes'] / F / 1e3:.1f}", f"{r['seconds']:.1f}", f"{1e3 * r['seconds'] / F:.2f}",
                 f"{r['index'] / 1e3:.1f}", f"{r['index_load'] / 1e3:,.0f}", f"{r['page_load'] / 1e3:,.0f}",
                 f"{r['rss'] / 1e6:,.0f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
