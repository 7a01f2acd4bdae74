"""Feature absorption: the metric on planted codes, the main-latent rule, the word activations, and the CLI on
a tiny finished run."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_analysis, tiny_job

from sae import absorption as ab
from sae import site
from sae.absorption import LETTERS, absorption, listed_words, main_latents, vocab_words, word_activations
from sae.harvest import capture
from sae.pipeline import run_training

D = 32
S, T = LETTERS.index("s"), LETTERS.index("t")
DIRECTIONS = torch.eye(len(LETTERS), D)  # [C, D] letter c's probe direction is e_c
e = torch.eye(D)
# Latents: 0 "starts with S", 1 "short" (its decoder row half S), 2 unrelated, 3 "starts with T",
# 4 barely aligned with S (cos 0.01), 5 "short" without any S in its row.
W_DEC = torch.stack(
    [
        e[S],
        F.normalize(e[S] + e[30], dim=0),
        e[31],
        e[T],
        F.normalize(0.01 * e[S] + e[29], dim=0),
        e[30],
    ]
)  # [F, D]
MAIN = [[0] if c == S else [3] if c == T else [] for c in range(len(LETTERS))]


def planted(
    rows: list[dict[int, float]], error: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes z [B, F] from {latent: activation} rows, and inputs x = z @ W_dec plus `error` along e_S and an
    error orthogonal to every probe direction."""
    z = torch.zeros(len(rows), len(W_DEC))
    for i, row in enumerate(rows):
        for j, a in row.items():
            z[i, j] = a
    x = z @ W_DEC + 0.3 * e[27]
    if error is not None:
        x += torch.tensor(error)[:, None] * e[S]
    return z, x


def test_planted_absorption_reports_exactly_the_absorbed_share():
    # 7 S-words where the parent fires, 3 where the child takes over alone (fully absorbed), 1 where both fire
    # (partly absorbed), and 4 T-words where T's parent fires.
    rows = [{0: 2.0, 2: 1.0}] * 7 + [{1: 2.0, 2: 1.0}] * 3 + [{0: 0.5, 1: 2.0}] + [{3: 1.0, 2: 0.5}] * 4
    labels = torch.tensor([S] * 11 + [T] * 4)
    z, x = planted(rows)
    r = absorption(z, x, W_DEC, DIRECTIONS, labels, MAIN)
    assert r.absorbed.tolist() == [False] * 7 + [True] * 3 + [False] * 5
    child = 2 / math.sqrt(2)  # the child's projection on S: 2 * cos 45 degrees
    partial = child / (child + 0.5)
    assert r.fraction[7:10].tolist() == [1.0] * 3 and r.fraction[10] == pytest.approx(partial)
    assert float(r.fraction[:7].abs().sum() + r.fraction[11:].abs().sum()) == 0
    assert r.letter_words[S] == 11 and r.letter_words[T] == 4
    assert r.letter_rate[S] == pytest.approx(3 / 11) and r.letter_rate[T] == 0
    assert r.letter_fraction[S] == pytest.approx((3 + partial) / 11)
    assert math.isnan(float(r.letter_rate[0]))  # no A-words
    assert r.rate == pytest.approx(3 / 11 / 2) and r.mean_fraction == pytest.approx((3 + partial) / 11 / 2)
    # Counted as main, the child is feature splitting, not absorption.
    split = [m + [1] if c == S else m for c, m in enumerate(MAIN)]
    assert absorption(z, x, W_DEC, DIRECTIONS, labels, split).rate == 0


def test_no_absorption_reports_zero():
    rows = (
        [{0: 2.0, 5: 2.0}] * 5  # the parent fires; the child's row holds no S
        + [{4: 50.0}] * 2  # the parent is silent and the latent that fires is aligned at cos 0.01 only
        + [{1: 2.0}]  # the aligned child fires, but the input points away from S (the SAE's error)
        + [{2: 1.0}]  # nothing on S fires: the probe reads S in the SAE's error
        + [{0: 1.0}]  # the parent carries half the probe's projection, the SAE's error the rest
    )
    z, x = planted(rows, error=[0.0] * 5 + [0.0, 0.0] + [-3.0] + [1.0] + [1.0])
    r = absorption(z, x, W_DEC, DIRECTIONS, torch.tensor([S] * len(rows)), MAIN)
    assert not r.absorbed.any() and float(r.fraction.abs().sum()) == 0
    assert r.rate == 0 and r.mean_fraction == 0
    # The same words with the parent silent and the aligned child alone are absorbed: the zeros above are not
    # the metric's only answer.
    z[:5, 0], z[:5, 1] = 0.0, 2.0
    assert absorption(z, z @ W_DEC, W_DEC, DIRECTIONS, torch.tensor([S] * len(rows)), MAIN).absorbed[:5].all()


def test_main_latents_take_split_features_but_not_a_rare_absorber():
    # 100 S-words, 100 T-words, 40 others; latent 0 fires on S-words 0..49, latent 1 on 50..97 (S split in
    # two), latent 2 on S-word 98 only (an absorber), latent 3 on every T-word and 10 others, latent 4 on all.
    labels = torch.tensor([S] * 100 + [T] * 100 + [0] * 40)
    fires = torch.zeros(240, 5, dtype=torch.bool)
    fires[:50, 0] = fires[50:98, 1] = fires[98, 2] = True
    fires[100:210, 3] = fires[:, 4] = True
    mains, f1 = main_latents(fires, labels)
    assert sorted(mains[S]) == [0, 1] and f1[S] == pytest.approx(2 * 98 / (98 + 100))
    assert mains[T] == [3] and f1[T] == pytest.approx(2 * 100 / (110 + 100))
    assert mains[LETTERS.index("q")] == [] and f1[LETTERS.index("q")] == 0


def test_vocab_words_are_the_whole_word_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<s>", "Ġapple", "ĠApple", "Ġa", "Ġx1", "apple", "Ġtiger", "Ġcafé", "Ġzebra", "Ġ"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    words = vocab_words(tokenizer)
    assert words.text == ["apple", "Apple", "zebra"]  # not " a", " x1", "apple", the example " tiger", "café"
    assert words.ids == [[1], [2], [8]] and words.labels.tolist() == [0, 0, 25]


def test_bad_word_lists_are_refused_naming_them(tokenizer):
    with pytest.raises(ValueError, match=r"'1st'.*one word a line"):
        listed_words(tokenizer, ["apple", "1st", " bee"])
    with pytest.raises(ValueError, match=r"yields 3 words over 2 first letters.*at least 100 words"):
        ab.check_words(listed_words(tokenizer, ["apple", "bee", "axe"]), "the word list")


def tiny_words() -> list[str]:
    """Words whose last byte is their first letter (`aa`, `Aaa`, ...): the tiny random model's activation at
    a word's last token then tells its letter, so a probe that reads the right position is accurate."""
    return [c * n for c in LETTERS for n in range(2, 6)] + [
        c.upper() + c * n for c in LETTERS for n in range(1, 4)
    ]


def test_packed_activations_equal_each_word_read_alone(tiny):
    model, tokenizer = tiny
    words = listed_words(tokenizer, tiny_words()[::7])
    module = "model.layers.1"
    x = word_activations(model, tokenizer, module, words, seed=3, context=100, batch_size=3)
    order = torch.randperm(len(words.text), generator=torch.Generator().manual_seed(3)).tolist()
    seqs, reads = ab._contexts(tokenizer, words, order, 100)
    assert len(seqs) > 3 and sorted(w for _, _, w in reads) == list(range(len(words.text)))
    # The first and last word of each context (the last context is the most padded in its batch).
    ends = [
        r
        for i, r in enumerate(reads)
        if i in (0, len(reads) - 1) or reads[i - 1][0] != r[0] or reads[i + 1][0] != r[0]
    ]
    for n, t, w in ends:
        prompt = seqs[n][: t + 1]  # the context up to the word's last token, unpadded
        assert prompt[-len(words.ids[w]) :] == words.ids[w]
        alone = capture(model, [module], torch.tensor([prompt]))[module][0, -1]
        torch.testing.assert_close(x[w], alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory) -> Path:
    """A finished run of the tiny model with an analysis (of random codes: only the dashboard's header is looked
    at) and its dashboard, and a word list for it beside it."""
    tmp = tmp_path_factory.mktemp("absorb")
    job = tiny_job(tmp, corpus, sae={"expansion_factor": 4})
    run_training(job)
    run_dir = Path(job.run_dir)
    random_analysis(run_dir, 256)
    site.build_site(run_dir)
    (tmp / "words.txt").write_text("\n".join(tiny_words()) + "\n")
    return run_dir


def test_cli_merges_metrics_and_shows_them_on_the_dashboard(tiny_run, capsys):
    before = json.loads((tiny_run / "metrics.json").read_text())
    header = (tiny_run / "dashboard" / "index.html").read_text()
    assert f"FVU {before['fvu']:.3f}" in header and "absorption" not in header
    (result,) = ab.main([str(tiny_run), "--words", str(tiny_run.parent / "words.txt"), "--seed", "1"])
    out = capsys.readouterr().out
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert {k: metrics[k] for k in before} == before  # the old keys kept
    assert metrics["absorption_words"] == len(tiny_words()) == result["words"]
    assert metrics["absorption_probe_accuracy"] > 0.5  # chance is 1/26: the probe reads each word's position
    assert 0 <= metrics["absorption_rate"] <= 1 and 0 <= metrics["absorption_fraction"] <= 1
    saved = json.loads((tiny_run / "absorption.json").read_text())
    letters = saved["letters"]
    assert sum(r["words"] for r in letters.values()) == saved["evaluated_words"] > 0
    scored = [r for r in letters.values() if r["words"]]
    assert metrics["absorption_rate"] == pytest.approx(sum(r["rate"] for r in scored) / len(scored), abs=1e-3)
    assert all(r["main"] and r["absorbed"] <= r["words"] for r in scored)
    assert f"absorption rate {metrics['absorption_rate']}" in out and "main latents" in out
    header = (tiny_run / "dashboard" / "index.html").read_text()
    assert (
        f"absorption rate {metrics['absorption_rate']:.3f}" in header and f"FVU {before['fvu']:.3f}" in header
    )


def test_cli_refuses_bad_input_naming_it(tiny_run, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=f"{missing}.*does not exist"):
        ab.main([str(missing)])
    # The byte-level tokenizer has no whole-word tokens.
    with pytest.raises(SystemExit, match=r"model.name='tiny'.*yields 0 words.*--words FILE"):
        ab.main([str(tiny_run)])
    with pytest.raises(SystemExit, match=r"--words .*none.txt.*not a file"):
        ab.main([str(tiny_run), "--words", str(tmp_path / "none.txt")])


def test_runs_of_one_model_share_the_word_activations(tiny_run, tmp_path, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return word_activations(*args, **kwargs)

    monkeypatch.setattr(ab, "word_activations", counted)
    words = str(tiny_run.parent / "words.txt")
    with pytest.raises(SystemExit, match="nowhere"):  # every run directory is checked before the long work
        ab.main([str(tiny_run), str(tmp_path / "nowhere"), "--words", words])
    assert calls == []
    first, again = ab.main([str(tiny_run), str(tiny_run), "--words", words])
    assert calls == ["model.layers.1"]
    assert {k: v for k, v in first.items() if k != "wall_seconds"} == {
        k: v for k, v in again.items() if k != "wall_seconds"
    }
