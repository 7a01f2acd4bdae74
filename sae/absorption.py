"""Feature absorption on a first-letter task (Chanin et al. 2024, "A is for Absorption", arXiv 2409.14507),
after SAEBench's absorption eval (`sae_bench/evals/absorption/`), simplified.

    python -m sae.absorption runs/demo                      # every whole-word token of the vocabulary
    python -m sae.absorption runs/demo --device cuda --seed 1
    python -m sae.absorption runs/demo --words words.txt    # a word list instead (one word a line)
    python -m sae.absorption runs/sweep/*-k32-x8            # several SAEs of one model and module: the
                                                            # words' activations are made once

An SAE absorbs a feature when a latent that should fire (here "starts with S") stays silent on some inputs
because a more specific latent ("short") fires instead and carries the "starts with S" direction in its
decoder row. The steps:

1. Words: the vocabulary's whole-word tokens, a leading space and 2+ ASCII letters (` tiger`), labelled by
   their first letter folded to lowercase. Each is read in SAEBench's in-context template,
   `{word} has the first letter: {L}`, lines packed into contexts that start with BOS and two fixed example
   lines; the activation is the hooked module's output at the word's last token. Attention is causal, so a
   word's activation sees only the lines before it (other words, with their answers) and never its own
   answer; packing ~15 words a context costs 8 tokens a word, against ~27 for a context per word. Not
   BOS + the word alone: positions 1-2 after BOS are unlike any other (`analyze.skip_positions`).
2. A linear probe: multinomial logistic regression over the 26 letters on a seeded 80% of the words; its
   accuracy on the other 20% is reported. Row c of its weights, normalised, is letter c's direction d_c.
3. Main latents of each letter: SAEBench grows a k-sparse probe on the SAE's codes while its F1 rises by
   more than 0.03 (k <= 10). Here the classifier is "any of the chosen latents fires", grown greedily on the
   training words by the latent that raises its F1 most: the same rule the metric's "the main latents do
   not fire" then reads.
4. `absorption`, on the test words the probe classifies correctly: the metric, defined in its docstring.

Writes `absorption_*` keys into RUN_DIR/metrics.json (the other keys kept), the per-letter results to
RUN_DIR/absorption.json, and rebuilds RUN_DIR/dashboard when RUN_DIR/analysis exists (its header shows the
absorption rate).
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.data import bos_eos
from sae.files import read_json, write_json
from sae.harvest import capture

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = " has the first letter: {L}"  # SAEBench's prompt_template, after the word
EXAMPLES = (" tiger", " river")  # the fixed in-context lines that open every context
MIN_WORDS = 100  # fewer leave a handful of test words a letter
TEST_FRACTION = 0.2
# SAEBench's thresholds (feature_absorption.py): the absorbing latent's decoder cosine with the probe, for
# full absorption and for the absorption fraction; the share of the probe projection the absorber(s) carry;
# the most latents counted as absorbing one word (fraction only).
COS_FULL, COS_FRACTION, SHARE, MAX_ABSORBERS = 0.025, 0.1, 0.4, 3
# SAEBench's feature-splitting rule (k_sparse_probing.py): grow while F1 rises by more than this, k <= 10.
F1_JUMP, MAX_MAIN = 0.03, 10


class Words(NamedTuple):
    """The words of the first-letter task."""

    text: list[str]
    """Each word as it reads, without its leading space."""
    ids: list[list[int]]
    """Its token ids, with the leading space (one id for a vocabulary word)."""
    labels: torch.Tensor
    """[W] its first letter, 0..25 for a..z."""


def _letter(word: str) -> int | None:
    c = word[:1].lower()
    return LETTERS.index(c) if c and c in LETTERS else None


def vocab_words(tokenizer, min_len: int = 2) -> Words:
    """The tokens of `tokenizer` that are a whole word: a leading space and `min_len`+ ASCII letters, in id
    order, leaving out the in-context examples."""
    special = set(tokenizer.all_special_ids)
    text, ids = [], []
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        s = tokenizer.convert_tokens_to_string([token])
        w = s[1:]
        if (
            s.startswith(" ")
            and len(w) >= min_len
            and w.isascii()
            and w.isalpha()
            and i not in special
            and s not in EXAMPLES
        ):
            text.append(w)
            ids.append([i])
    return Words(text, ids, torch.tensor([_letter(w) for w in text], dtype=torch.long))


def listed_words(tokenizer, words: list[str], source: str = "the word list") -> Words:
    """`words` (each starting with an ASCII letter) tokenized with a leading space, in the order given."""
    bad = [w for w in words if _letter(w) is None or w != w.strip()]
    if bad:
        raise ValueError(
            f"{source} holds {len(bad)} words that do not start with an ASCII letter or have spaces around them, "
            f"e.g. {bad[:5]}: give one word a line, each starting with a..z or A..Z"
        )
    ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    return Words(list(words), ids, torch.tensor([_letter(w) for w in words], dtype=torch.long))


def check_words(words: Words, source: str, hint: str = "") -> None:
    """Raises unless `words` are enough for the task, MIN_WORDS words over at least two letters, naming
    `source` and adding `hint`."""
    letters = len(set(words.labels.tolist()))
    if len(words.text) < MIN_WORDS or letters < 2:
        raise ValueError(
            f"{source} yields {len(words.text)} words over {letters} first letters; the first-letter task needs "
            f"at least {MIN_WORDS} words over 2+ letters{hint}"
        )


# --- activations ----------------------------------------------------------------------------------------


def _contexts(
    tokenizer, words: Words, order: list[int], context: int
) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Token ids of the packed contexts, and (context, position, word) of each word's last token."""
    bos, _ = bos_eos(tokenizer)

    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    nl = enc("\n")
    answer = [enc(TEMPLATE.format(L=c.upper())) for c in LETTERS]
    prefix = [bos] + [t for w in EXAMPLES for t in nl + enc(w) + answer[LETTERS.index(w[1])]]
    seqs: list[list[int]] = []
    reads: list[tuple[int, int, int]] = []
    seq = list(prefix)
    for w in order:
        line = nl + words.ids[w] + answer[int(words.labels[w])]
        if len(seq) + len(line) > context and len(seq) > len(prefix):
            seqs.append(seq)
            seq = list(prefix)
        reads.append((len(seqs), len(seq) + len(nl) + len(words.ids[w]) - 1, w))
        seq += line
    seqs.append(seq)
    return seqs, reads


def word_activations(
    model,
    tokenizer,
    module: str,
    words: Words,
    seed: int = 0,
    context: int = 128,
    batch_size: int = 16,
) -> torch.Tensor:
    """[W, D] float32 activations of `module` at each word's last token, read in the in-context template.

    The words are packed in a seeded random order, so that a word's context lines are no guide to its letter
    whatever order the list comes in; contexts are padded on the right (which causal attention never sees)."""
    _, eos = bos_eos(tokenizer)
    order = torch.randperm(len(words.text), generator=torch.Generator().manual_seed(seed)).tolist()
    seqs, reads = _contexts(tokenizer, words, order, context)
    where = torch.tensor(reads)  # [W, 3] (context, position, word), contexts in order
    out = torch.empty(0)
    for start in tqdm(range(0, len(seqs), batch_size), desc="word activations", unit="batch", leave=False):
        batch = seqs[start : start + batch_size]
        T = max(len(s) for s in batch)
        ids = torch.tensor([s + [eos] * (T - len(s)) for s in batch])  # [N, T]
        acts = capture(model, [module], ids)[module].float().cpu()  # [N, T, D]
        if not len(out):
            out = torch.empty(len(words.text), acts.shape[-1])
        n, t, w = where[(where[:, 0] >= start) & (where[:, 0] < start + len(batch))].T
        out[w] = acts[n - start, t]
    return out


# --- probe and main latents ----------------------------------------------------------------------------


def train_probe(
    x: torch.Tensor, y: torch.Tensor, n_classes: int = len(LETTERS), l2: float = 1e-3, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, logits = x @ W.T + b: (W [C, D], b [C]) minimising the mean
    cross-entropy plus l2 * ||W||^2 on x centred and scaled to unit mean square per dimension (L-BFGS from
    zero, so deterministic); returned in the units of x."""
    x = x.detach().clone().float()  # a normal tensor: activations are captured in inference mode
    mu = x.mean(0)
    s = float((x - mu).square().mean().sqrt()) or 1.0
    xs = (x - mu) / s
    W = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ W.T + b, y) + l2 * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[arg-type]  # LBFGS's closure returns the loss
    W_raw = W.detach() / s
    return W_raw, b.detach() - mu @ W_raw.T


def main_latents(
    fires: torch.Tensor, labels: torch.Tensor, n_classes: int = len(LETTERS), candidates: int = 32
) -> tuple[list[list[int]], list[float]]:
    """Each letter's main latents and the F1 of "any of them fires" for it, from fires [N, F] (bool) and
    labels [N]: the best single latent, then while the F1 rises by more than F1_JUMP (and at most MAX_MAIN),
    the one of the `candidates` best single latents that raises it most (SAEBench's feature-splitting rule
    over a k-sparse probe, here with "fires" as the classifier)."""
    total = fires.sum(0)  # [F]
    mains: list[list[int]] = []
    f1s: list[float] = []
    for c in range(n_classes):
        pos = labels == c
        n_pos = int(pos.sum())
        if n_pos == 0:
            mains.append([])
            f1s.append(0.0)
            continue
        single = 2 * fires[pos].sum(0) / (total + n_pos)  # [F] F1 of each latent alone
        cand = single.topk(min(candidates, len(single))).indices
        f = fires[:, cand]  # [N, C']
        union = torch.zeros(len(labels), dtype=torch.bool)
        chosen: list[int] = []  # positions in `cand`
        best = -1.0
        while len(chosen) < MAX_MAIN:
            new = union[:, None] | f  # [N, C']
            f1 = 2 * (new & pos[:, None]).sum(0) / (new.sum(0) + n_pos)  # [C']
            f1[chosen] = -1.0
            j = int(f1.argmax())
            if float(f1[j]) <= best + F1_JUMP:
                break
            chosen.append(j)
            union, best = new[:, j], float(f1[j])
        mains.append(cand[chosen].tolist())
        f1s.append(max(best, 0.0))
    return mains, f1s


# --- the metric -----------------------------------------------------------------------------------------


class Absorption(NamedTuple):
    """The absorption of a set of words (`absorption`)."""

    absorbed: torch.Tensor
    """[B] bool: word i fully absorbed."""
    fraction: torch.Tensor
    """[B] its absorption fraction, in [0, 1]."""
    letter_rate: torch.Tensor
    """[C] mean of `absorbed` over the words of each letter (NaN for a letter with none)."""
    letter_fraction: torch.Tensor
    """[C] mean of `fraction` over the words of each letter (NaN for a letter with none)."""
    letter_words: torch.Tensor
    """[C] words of each letter."""
    rate: float
    """Absorption rate: the mean of `letter_rate` over the letters with words."""
    mean_fraction: float
    """Absorption fraction: the mean of `letter_fraction` over the letters with words."""


def absorption(
    z: torch.Tensor,
    x: torch.Tensor,
    W_dec: torch.Tensor,
    directions: torch.Tensor,
    labels: torch.Tensor,
    main: list[list[int]],
) -> Absorption:
    """Feature absorption of B words (Chanin et al. 2024; SAEBench's full-absorption rate and Demian Till's
    absorption fraction), from their codes z [B, F], the SAE's inputs less its decoder bias x [B, D] (what the
    latents must carry), decoder rows W_dec [F, D], unit probe directions [C, D], letters labels [B] and each
    letter's main latents `main` (C lists). For word i of letter c = labels[i], with d = directions[c]:

        p_i    = x_i . d                    the probe's projection
        q_ij   = z_ij (W_dec_j . d)         latent j's share of it (z_ij cos_j for a unit decoder row)
        cos_j  = cos(W_dec_j, d)
        j*     = argmax_j q_ij              the top projecting latent

        absorbed_i = [z_ij = 0 for all j in main_c]  and  p_i > 0  and  cos_j* >= 0.025  and  q_ij* >= 0.4 p_i

        m_i = sum_{j in main_c} q_ij        A_i = the sum of the 3 largest q_ij > 0 over j not in main_c
                                                  with cos_j >= 0.1
        fraction_i = 0                       if p_i <= 0 or m_i >= p_i or A_i < 0.4 p_i
                     1                       else if m_i <= 0
                     a / (a + m_i)           otherwise, a = min(A_i, p_i - m_i)

    rate = mean over letters c with words of mean_{i: labels_i = c} absorbed_i; `mean_fraction` likewise.
    SAEBench reads p_i off the raw input; here x excludes b_dec, which no latent carries."""
    B, n_classes = len(labels), len(directions)
    along = W_dec @ directions.T  # [F, C] W_dec_j . d_c
    cos = F.normalize(W_dec, dim=1) @ F.normalize(directions, dim=1).T  # [F, C]
    is_main = torch.zeros(n_classes, W_dec.shape[0], dtype=torch.bool)  # [C, F]
    for c, latents in enumerate(main):
        is_main[c, latents] = True
    d = directions[labels]  # [B, D]
    p = (x * d).sum(1)  # [B]
    q = z * along[:, labels].T  # [B, F]
    cos_b = cos[:, labels].T  # [B, F]
    main_b = is_main[labels]  # [B, F]
    silent = ~(main_b & (z > 0)).any(1)  # [B]
    top_q, top = q.max(1) if q.shape[1] else (torch.zeros(B), torch.zeros(B, dtype=torch.long))
    top_cos = cos_b.gather(1, top[:, None])[:, 0]
    absorbed = silent & (p > 0) & (top_cos >= COS_FULL) & (top_q >= SHARE * p)

    m = (q * main_b).sum(1)  # [B]
    q_abs = torch.where(~main_b & (cos_b >= COS_FRACTION) & (q > 0), q, torch.zeros_like(q))
    A = q_abs.topk(min(MAX_ABSORBERS, q.shape[1]), dim=1).values.sum(1)  # [B]
    a = torch.minimum(A, p - m)
    fraction = torch.where(m <= 0, torch.ones_like(p), (a / (a + m)).clamp(0, 1))
    fraction = torch.where((p <= 0) | (m >= p) | (A < SHARE * p), torch.zeros_like(p), fraction)

    n = torch.bincount(labels, minlength=n_classes)  # [C]
    with_words = n > 0
    rate_c = torch.bincount(labels, absorbed.float(), minlength=n_classes) / n
    frac_c = torch.bincount(labels, fraction.float(), minlength=n_classes) / n
    rate = float(rate_c[with_words].mean()) if with_words.any() else math.nan
    mean_fraction = float(frac_c[with_words].mean()) if with_words.any() else math.nan
    return Absorption(absorbed, fraction, rate_c, frac_c, n, rate, mean_fraction)


# --- a run ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def _codes(sae, x: torch.Tensor, fired: bool = False, batch_size: int = 2048) -> torch.Tensor:
    """Dense codes [B, F] of x [B, D] (float32, on the CPU), or with `fired` whether each latent fires (bool)."""
    out = []
    for i in range(0, len(x), batch_size):
        z = sae.dense(sae.encode(x[i : i + batch_size].to(sae.W_dec.device))).float().cpu()  # [b, F]
        out.append(z > 0 if fired else z)
    return torch.cat(out)


def task(run, words: Words | None = None, seed: int = 0) -> tuple[Words, torch.Tensor]:
    """The task's words, checked (default: the whole-word tokens of `run`'s tokenizer), and their activations
    [W, D] in `run`'s model and module (`run`: an `open_run` with the model)."""
    if words is None:
        words = vocab_words(run.tokenizer)
        hint = (
            " (whole-word tokens: a leading space and 2+ ASCII letters); pass a word list instead with "
            "--words FILE (one word a line)"
        )
        check_words(words, f"the tokenizer of model.name={run.job.model.name!r}", hint)
    else:
        check_words(words, "the word list")
    return words, word_activations(run.model, run.tokenizer, run.module, words, seed=seed)


def evaluate(sae, words: Words, x: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """The first-letter absorption of `sae` on `words` and their activations x [W, D] (`task`): a probe on a
    seeded 80% of the words, main latents from the same 80%, and the metric on the test words the probe
    classifies correctly. Returns the results as JSON-ready values."""
    y = words.labels
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(TEST_FRACTION * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    W_probe, b_probe = train_probe(x[train], y[train])
    pred = (x[test] @ W_probe.T + b_probe).argmax(1)
    right = pred == y[test]
    main, main_f1 = main_latents(_codes(sae, x[train], fired=True), y[train])
    ok = test[right]
    W_dec = sae.W_dec.detach().float().cpu()
    b_dec = sae.b_dec.detach().float().cpu()
    result = absorption(_codes(sae, x[ok]), x[ok] - b_dec, W_dec, F.normalize(W_probe, dim=1), y[ok], main)

    def num(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 4)

    letters = {
        c: {
            "words": int(result.letter_words[i]),
            "absorbed": int(result.absorbed[y[ok] == i].sum()),
            "rate": num(float(result.letter_rate[i])),
            "fraction": num(float(result.letter_fraction[i])),
            "main": main[i],
            "main_f1": round(main_f1[i], 4),
        }
        for i, c in enumerate(LETTERS)
    }
    return {
        "rate": num(result.rate),
        "fraction": num(result.mean_fraction),
        "probe_accuracy": round(float(right.float().mean()), 4),
        "words": len(y),
        "test_words": n_test,
        "evaluated_words": len(ok),
        "seed": seed,
        "template": "\\n{word}" + TEMPLATE.replace("{L}", "{LETTER}"),
        "letters": letters,
    }


def table(result: dict) -> str:
    """The per-letter table and the overall figures, as printed."""
    lines = [f"{'letter':<7}{'words':>6}{'absorbed':>9}{'rate':>7}{'fraction':>9}  main latents (F1)"]
    for c, r in result["letters"].items():
        if not r["words"]:
            continue
        rate = "-" if r["rate"] is None else f"{r['rate']:.3f}"
        frac = "-" if r["fraction"] is None else f"{r['fraction']:.3f}"
        main = " ".join(str(j) for j in r["main"])
        lines.append(
            f"{c:<7}{r['words']:>6}{r['absorbed']:>9}{rate:>7}{frac:>9}  {main} ({r['main_f1']:.2f})"
        )
    lines.append(
        f"absorption rate {result['rate']}, absorption fraction {result['fraction']} (means over letters); "
        f"probe accuracy {result['probe_accuracy']} on {result['test_words']} test words of {result['words']}; "
        f"{result['evaluated_words']} test words classified correctly were scored"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """`python -m sae.absorption RUN_DIR [RUN_DIR ...] [--device D] [--seed S] [--words FILE]`."""
    from sae import site
    from sae.rundir import open_run, sae_dir

    parser = argparse.ArgumentParser(prog="python -m sae.absorption", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="finished run directories (sae.safetensors, run.json); runs of one model and module share the "
        "word activations",
    )
    parser.add_argument("--device", help="where the model and SAE run (default: the run's model.device)")
    parser.add_argument("--seed", type=int, default=0, help="the train/test split and packing order")
    parser.add_argument(
        "--words", type=Path, help="a word list, one a line, instead of the vocabulary's words"
    )
    args = parser.parse_args(argv)
    results = []
    shared: dict[tuple, tuple[Words, torch.Tensor]] = {}  # the task of each model and module
    try:
        for run_dir in args.run_dirs:  # before the long work
            sae_dir(run_dir)
        if args.words is not None and not args.words.is_file():
            raise FileNotFoundError(
                f"--words {str(args.words)!r} is not a file: give a text file, one word a line"
            )
        for run_dir in args.run_dirs:
            start = time.time()
            run = open_run(run_dir, device=args.device)
            assert run.job is not None  # open_run with the model reads run.json
            m = run.job.model
            key = (m.name, m.gguf_file, m.dtype, str(run.model.device), run.module)
            if key not in shared:
                words = None
                if args.words is not None:
                    lines = [w for w in args.words.read_text(encoding="utf-8").splitlines() if w.strip()]
                    words = listed_words(run.tokenizer, lines, f"--words {str(args.words)!r}")
                shared[key] = task(run, words, seed=args.seed)
            result = evaluate(run.sae, *shared[key], seed=args.seed)
            result["wall_seconds"] = round(time.time() - start, 1)
            results.append(result)
            print(f"{run.dir}:\n{table(result)}", flush=True)
            _save(run.dir, result)
            if (run.dir / "analysis" / "features.json").is_file():
                print(f"dashboard: {site.build_site(run.dir)}", flush=True)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    return results


def _save(run_dir: Path, result: dict) -> None:
    """Writes `result` to run_dir/absorption.json and its headline into run_dir/metrics.json (keeping the rest)."""
    write_json(run_dir / "absorption.json", result)
    path = run_dir / "metrics.json"
    metrics = read_json(path, "metrics file") if path.is_file() else {}
    metrics |= {f"absorption_{k}": result[k] for k in ("rate", "fraction", "probe_accuracy", "words")}
    write_json(path, metrics)
    print(f"wrote {path} and {run_dir / 'absorption.json'} ({result['wall_seconds']} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
