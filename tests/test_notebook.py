"""`sae.explore` and the dashboard notebook on a tiny trained run: which features fire on a text, the HTML
views, and the notebook executed end to end in a kernel of this interpreter."""

import html
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from sae import explore, harvest
from sae.config import (
    AnalyzeConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
    TrainJob,
    WandbConfig,
)
from sae.data import bos_eos
from sae.explore import Explorer, TextFeatures
from sae.model import Code
from sae.pipeline import run_training

REPO = Path(__file__).resolve().parents[1]
HOSTILE = ["The", " </script>", "<b>", ' "x" & y', "\n", "'"]


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory) -> Path:
    """A trained and analysed TopK SAE on block 1 of the tiny model (a couple of seconds)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_training(
        TrainJob(
            model=ModelConfig(name="tiny", dtype="float32", layer=1, batch_size=4, device="cpu"),
            data=DataConfig(path=str(corpus), context_size=32),
            sae=SAEConfig(k=8, expansion_factor=2),
            train=TrainConfig(tokens=2048, harvest_tokens=2048, batch_size=256),
            eval=EvalConfig(tokens=1024, loss_contexts=0, train_loss_contexts=0),
            analyze=AnalyzeConfig(tokens=1024, top_k=3),
            wandb=WandbConfig(mode="disabled"),
            run_dir=str(run_dir),
        )
    )
    return run_dir


@pytest.fixture(scope="module")
def explorer(tiny_run) -> Explorer:
    return Explorer.load(tiny_run)


def _direct(ex: Explorer, ids: list[int]) -> torch.Tensor:
    """Dense codes [T, F] of one context BOS + ids, computed step by step as the harvest does."""
    bos, _ = bos_eos(ex.tokenizer)
    x = harvest.capture(ex.model, [ex.module], torch.tensor([[bos, *ids]]))[ex.module][0, 1:].float()
    keep = harvest.keep_rows(x, ex.job.model.max_norm_ratio)
    z = torch.zeros(len(ids), ex.sae.d_sae)
    z[keep] = ex.sae.dense(ex.sae.encode(x[keep]))
    return z


def test_load_reads_the_run(explorer: Explorer, tiny_run: Path):
    assert explorer.module == "model.layers.1"
    assert explorer.sae.d_sae == 128 and explorer.sae.k == 8
    assert explorer.analysis is not None and len(explorer.analysis["features"]) == 128
    assert explorer.metrics is not None and explorer.metrics["l0"] == pytest.approx(8, abs=0.01)
    assert explorer.feature(5)["id"] == 5
    with pytest.raises(ValueError, match=r"feature 128 .* 0\.\.127"):
        explorer.feature(128)


def test_load_explains_what_is_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no run.json: is it a finished training run"):
        Explorer.load(tmp_path)
    for name in ("topk-k8-x2", "relu-k8-x2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="several SAEs") as err:
        Explorer.load(tmp_path)
    assert str(tmp_path / "relu-k8-x2") in str(err.value)


def test_features_on_text_equal_encoding_the_captured_activations(explorer: Explorer):
    text = "The Eiffel Tower is in Paris."
    found = explorer.features_on_text(text, top=5)
    ids = explorer.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert found.ids == ids and len(found.tokens) == len(ids) == len(text)  # bytes; no BOS
    assert "".join(found.tokens) == text and all(found.kept)
    z = _direct(explorer, ids)
    torch.testing.assert_close(explorer.sae.dense(found.code), z)
    for t, row in enumerate(found.per_token()):
        live = z[t].nonzero().flatten()
        assert sorted(f for f, _ in row["features"]) == sorted(live.tolist())
        assert [a for _, a in row["features"]] == sorted((a for _, a in row["features"]), reverse=True)
    assert found.acts(3) == pytest.approx(z[:, 3].tolist())
    # Ranked by total activation on the text, with what the analysis says of each feature.
    total = z.sum(dim=0)
    assert [r["id"] for r in found.ranked] == total.topk(5).indices.tolist()
    top = found.ranked[0]
    assert top["total"] == pytest.approx(total.max().item(), abs=1e-3)
    assert top["max"] == pytest.approx(z[:, top["id"]].max().item(), abs=1e-3)
    assert top["tokens"] == int((z[:, top["id"]] > 0).sum())
    info = explorer.feature(top["id"])
    assert top["density"] == info["density"] and top["max_act"] == info["max_act"]
    assert top["promotes"] == [t for t, _ in info["top_logits"][:5]]
    assert "«" in top["example"]
    by_max = explorer.features_on_text(text, top=3, by="max")
    assert [r["id"] for r in by_max.ranked] == z.max(dim=0).values.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="by='mean'"):
        explorer.features_on_text(text, by="mean")


def test_long_text_is_packed_into_contexts_that_start_with_bos(explorer: Explorer, monkeypatch):
    contexts = []
    capture = harvest.capture
    monkeypatch.setattr(harvest, "capture", lambda m, n, ids: contexts.append(ids) or capture(m, n, ids))
    text = "Rivers carry sediment from the mountains down to the sea. " * 2  # 116 byte tokens, > 3 contexts
    found = explorer.features_on_text(text)
    bos, _ = bos_eos(explorer.tokenizer)
    T = explorer.job.data.context_size
    assert [c.shape[1] for c in contexts] == [T, T, T, 116 - 3 * (T - 1) + 1]
    assert all(c[0, 0] == bos for c in contexts) and len(found.tokens) == 116
    step = T - 1
    z = torch.cat([_direct(explorer, found.ids[i : i + step]) for i in range(0, 116, step)])
    torch.testing.assert_close(explorer.sae.dense(found.code), z)


def test_special_tokens_and_massive_activations_are_skipped(explorer: Explorer, monkeypatch):
    capture = harvest.capture

    def massive(model, names, ids):  # the 3rd text token (position 3 after BOS) at 1000x its norm
        out = {name: x.clone() for name, x in capture(model, names, ids).items()}
        out[names[0]][0, 3] *= 1000
        return out

    monkeypatch.setattr(harvest, "capture", massive)
    found = explorer.features_on_text("ab<eos>cd")
    assert found.tokens == ["a", "b", "<eos>", "c", "d"]
    assert found.kept == [True, True, False, True, True]  # position 3 after BOS is the special token
    found = explorer.features_on_text("abcd")
    assert found.kept == [True, True, False, True]
    assert not found.code.acts[2].any() and found.per_token()[2]["features"] == []
    page = explore.text_html(found, found.ranked[0]["id"])
    assert page.count("line-through") == 1 and "skipped" in page


def _found() -> TextFeatures:
    acts = torch.tensor([[2.0, 1.0], [4.0, 0.0], [0.0, 0.0], [1.0, 3.0], [0.5, 0.0], [0.0, 0.0]])
    idx = torch.tensor([[7, 1], [7, 0], [0, 0], [1, 7], [2, 0], [0, 0]])
    ranked = [
        {
            "id": 7,
            "total": 9.0,
            "max": 4.0,
            "tokens": 3,
            "density": 0.01,
            "max_act": 8.0,
            "promotes": ["<i>", " Paris"],
            "example": "a«</script>»b",
        },
        {
            "id": 1,
            "total": 4.0,
            "max": 3.0,
            "tokens": 2,
            "density": None,
            "max_act": None,
            "promotes": [],
            "example": "",
        },
    ]
    kept = [True, True, False, True, True, True]
    return TextFeatures("".join(HOSTILE), [0] * 6, list(HOSTILE), kept, Code(acts, idx), 16, ranked)


def _token_spans(fragment: str) -> list[tuple[str, str, str]]:
    """(unescaped title, style, unescaped text) of every span with a title."""
    spans = re.findall(r'<span title="([^"]*)" style="([^"]*)">([^<]*)</span>', fragment)
    return [(html.unescape(title), style, html.unescape(text)) for title, style, text in spans]


def test_text_html_shades_by_one_feature_and_escapes_tokens():
    page = explore.text_html(_found(), 7)
    assert "</script>" not in page and "<b>" not in page and '"x"' not in page
    spans = _token_spans(page)
    assert [text for _, _, text in spans] == ["The", " </script>", "<b>", ' "x" & y', "↵", "'"]
    # Shading is relative to the feature's max activation in the analysis (8); hover shows the value.
    assert [s[1].split(";")[0] for s in spans] == [
        "background:rgba(255,140,0,0.25)",
        "background:rgba(255,140,0,0.50)",
        "background:rgba(255,140,0,0.00)",
        "background:rgba(255,140,0,0.38)",
        "background:rgba(255,140,0,0.00)",
        "background:rgba(255,140,0,0.00)",
    ]
    assert spans[3][0] == "' \"x\" & y'  feature 7: 3.000"
    assert "skipped" in spans[2][0] and "line-through" in spans[2][1]
    # Without an analysis max, shading is relative to the max on the text.
    assert "rgba(255,140,0,1.00)" in explore.text_html(_found(), 1)
    with pytest.raises(ValueError, match="latents 0..15"):
        explore.text_html(_found(), 16)


def test_tables_escape_tokens_and_analysis_text():
    found = _found()
    for page in (explore.tokens_html(found), explore.ranked_html(found)):
        assert "</script>" not in page and "<b>" not in page and "<i>" not in page
    tokens = explore.tokens_html(found, top=1)
    assert tokens.count("<tr>") == 1 + 6 and "&lt;b&gt;" in tokens and "skipped" in tokens
    assert "#7 4.00" in tokens and "#1 1.00" not in tokens  # only each token's strongest feature
    ranked = explore.ranked_html(found)
    assert "&lt;/script&gt;" in ranked and "&#x27;&lt;i&gt;&#x27;" in ranked and "1%" in ranked


def test_feature_card_renders_what_the_analysis_has():
    ex = {"act": 5.0, "row": 3, "pos": 40, "tokens": HOSTILE, "acts": [0, 1, 5, 2.5, 0, 0], "center": 2}
    base = {
        "id": 4,
        "density": 0.01,
        "max_act": 5.0,
        "mean_act": 2.0,
        "examples": [ex],
        "top_logits": [["<i>", 1.0]],
        "bottom_logits": [[" the", -1.0]],
    }
    card = explore.feature_card(base)
    assert "Feature 4" in card and "</script>" not in card and "<b>" not in card and "<i>" not in card
    assert "band" not in card and "histogram" not in card and "nearest" not in card
    # The optional fields in the shapes `sae.site` reads.
    full = base | {
        "histogram": {"edges": [0.0, 1.0, 2.0, 3.0], "counts": [1000, 0, 9]},
        "nearest": [[9, 0.75], [12, 0.5]],
        "intervals": [{"lo": 0.0, "hi": 2.5, "count": 1234, "examples": [ex | {"act": 1.0}]}],
    }
    card = explore.feature_card(full)
    assert "</script>" not in card and "<b>" not in card
    assert "histogram 0.00 … 3.00" in card
    assert re.findall(r"height:(\d+)px;background", card) == ["40", "1", "13"]  # log scale
    assert "#9 <small>0.75</small>" in card and "#12 <small>0.50</small>" in card
    assert "act 0.00 – 2.50 · 1,234 tokens" in card
    assert card.count("&lt;/script&gt;") == 2  # in the top example and the band's
    # Other shapes are left out rather than failing.
    odd = base | {"histogram": {"counts": [1, 2]}, "nearest": 3, "intervals": [{"lo": "x"}, 7]}
    assert explore.feature_card(odd) == explore.feature_card(base)


def test_index_html_sorts_and_escapes():
    ex = {"act": 1.0, "row": 0, "pos": 0, "tokens": ["<b>", "x"], "acts": [1.0, 0.0], "center": 0}
    feats = [
        {"id": 0, "density": 0.5, "max_act": 1.0, "mean_act": 0.5, "examples": [ex]},
        {"id": 1, "density": 0.0, "max_act": 0.0, "mean_act": 0.0, "examples": []},
        {
            "id": 2,
            "density": 0.1,
            "max_act": 3.0,
            "mean_act": 1.0,
            "examples": [],
            "top_logits": [["</td>", 1]],
        },
    ]
    analysis = {"features": feats}
    page = explore.index_html(analysis, n=2)
    assert re.findall(r"<strong>(\d+)</strong>", page) == ["2", "0"]
    assert "</td>" not in re.sub(r"</td>(?=<td|</tr>)", "", page)  # only the table's own cells close
    assert "«&lt;b&gt;»x" in page and "&#x27;&lt;/td&gt;&#x27;" in page
    assert re.findall(r"<strong>(\d+)</strong>", explore.index_html(analysis, sort="density")) == [
        "0",
        "2",
        "1",
    ]
    assert explore.feature_rows(analysis)[2]["promotes"] == "'</td>'"
    with pytest.raises(ValueError, match="sort='size'"):
        explore.index_html(analysis, sort="size")
    assert explore.feature_by_id(analysis, 2)["id"] == 2


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(REPO / "notebooks" / "dashboard.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_notebook_runs_against_a_trained_run(tiny_run: Path, tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernel spec for this interpreter, found first through JUPYTER_PATH, so the notebook runs in this
    # environment whatever other `python3` kernels the machine has.
    spec = tmp_path / "kernels" / "sae-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    env = {"SAE_RUN_DIR": str(tiny_run), "OMP_NUM_THREADS": "1"}
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "sae", "language": "python", "env": env})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    nb = nbformat.read(REPO / "notebooks" / "dashboard.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="sae-test", resources={"metadata": {"path": str(REPO / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError if a cell raised
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    pages = [o.get("data", {}).get("text/html", "") for o in outputs]
    assert "fvu" in text and "model.layers.1" in text
    assert any("<table" in p and "max_act" in p for p in pages)  # the index as a DataFrame
    assert any("Feature" in p and 'class="sae-card"' in p for p in pages)
    ranked = next(p for p in pages if ">top example<" in p and ">rank<" in p)
    top = re.search(r"<td[^>]*><strong>(\d+)</strong>", ranked)
    assert top is not None
    assert any('class="sae-text"' in p and f"feature {top.group(1)}:" in p for p in pages)
    assert sum(">pos<" in p for p in pages) == 1  # the per-token table
    tables = [o.get("data", {}).get("text/markdown", "") for o in outputs]
    truth = next(t for t in tables if "| MCC |" in t)  # the ground-truth section
    assert re.search(r"\| topk \| 0\.\d{3} \|", truth) and re.search(r"\| matryoshka \| 0\.\d{3} \|", truth)
    assert "no absorption measured yet: python -m sae.absorption" in text
