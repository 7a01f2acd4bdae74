"""The dashboard: loading, safe embedding of hostile tokens, the HTML of a feature, and the notebook."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sae.dashboard import feature_html, load_analysis, render_dashboard, top_features

REPO = Path(__file__).resolve().parents[1]
TOKENS = ["The", " cat", "</script>", "<b>", " & co", "\n", '  "x"']


def _analysis() -> dict:
    live = {
        "id": 0,
        "density": 0.012,
        "max_act": 5.0,
        "mean_act": 2.0,
        "examples": [
            {"act": 5.0, "row": 3, "pos": 40, "tokens": TOKENS, "acts": [0, 1, 5, 2.5, 0, 0, 0], "center": 2},
            {"act": 1.5, "row": 7, "pos": 2, "tokens": ["a", "\t"], "acts": [1.5, 0], "center": 0},
        ],
        "top_logits": [["<i>", 1.25], [" Paris", 0.5]],
        "bottom_logits": [[" the", -0.75]],
    }
    dead = {"id": 1, "density": 0.0, "max_act": 0.0, "mean_act": 0.0, "examples": []}
    strong = {
        "id": 2,
        "density": 0.0001,
        "max_act": 9.0,
        "mean_act": 4.0,
        "examples": [{"act": 9.0, "row": 1, "pos": 0, "tokens": ["'s", " end"], "acts": [9, 0], "center": 0}],
    }
    return {
        "model": "tiny <model>",
        "hook": "model.layers.1",
        "d_in": 8,
        "d_sae": 3,
        "k": 2,
        "n_tokens": 100,
        "window": [12, 4],
        "features": [live, dead, strong],
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "features.json").write_text(json.dumps(_analysis()), encoding="utf-8")
    return tmp_path


def _token_spans(fragment: str) -> list[tuple[str, str, str]]:
    """(title, style, unescaped text) of every token span."""
    spans = re.findall(r'<span title="(act=[^"]*)" style="([^"]*)">([^<]*)</span>', fragment)
    return [(title, style, html.unescape(text)) for title, style, text in spans]


def test_load_analysis_round_trips(run_dir: Path):
    assert load_analysis(run_dir) == _analysis()
    assert load_analysis(str(run_dir)) == _analysis()


def test_load_analysis_missing_file_says_what_to_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"analyze\.py run_dir=") as err:
        load_analysis(tmp_path / "nope")
    assert str(tmp_path / "nope" / "analysis" / "features.json") in str(err.value)


def test_top_features_skips_dead_and_sorts_by_max_act():
    assert [f["id"] for f in top_features(_analysis(), 5)] == [2, 0]
    assert [f["id"] for f in top_features(_analysis(), 1)] == [2]


def test_feature_html_escapes_tokens_and_marks_center():
    fragment = feature_html(_analysis()["features"][0])
    spans = _token_spans(fragment)
    first = spans[: len(TOKENS)]
    # Every token comes back as text, none as markup; newlines are shown, leading spaces kept.
    assert [text for _, _, text in first] == ["The", " cat", "</script>", "<b>", " & co", "↵", '  "x"']
    assert "</script>" not in fragment and "<b>" not in fragment and "<i>" not in fragment
    titles = ["act=0.00", "act=1.00", "act=5.00", "act=2.50", "act=0.00", "act=0.00", "act=0.00"]
    assert [title for title, _, _ in first] == titles
    outlined = [i for i, (_, style, _) in enumerate(first) if "outline" in style]
    assert outlined == [2]
    # Intensity is act / max_act.
    assert "rgba(255,140,0,1.00)" in first[2][1] and "rgba(255,140,0,0.50)" in first[3][1]
    assert "rgba(255,140,0,0.00)" in first[0][1]
    assert spans[len(TOKENS) + 1][2] == "⇥"
    assert "Feature 0" in fragment and "1.2%" in fragment and "log10 -1.92" in fragment
    assert "&lt;i&gt;" in fragment and "+1.25" in fragment and "-0.75" in fragment


def test_feature_html_dead_feature():
    fragment = feature_html(_analysis()["features"][1])
    assert "dead" in fragment and "no examples" in fragment and not _token_spans(fragment)


def test_render_dashboard_embeds_json_safely(tmp_path: Path):
    out = tmp_path / "site" / "dashboard.html"
    assert render_dashboard(_analysis(), out) == out
    page = out.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert block is not None
    assert not re.search(r"[<>&]", block.group(1))
    assert json.loads(block.group(1)) == _analysis()
    # Only the two real script blocks close; no leftover temp file from the atomic write.
    assert page.count("</script>") == 2
    assert [p.name for p in out.parent.iterdir()] == ["dashboard.html"]


def test_render_dashboard_is_self_contained_and_overwrites(tmp_path: Path):
    out = tmp_path / "dashboard.html"
    out.write_text("old")
    page = render_dashboard(_analysis(), out).read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert not re.search(r"https?://|<link|\bsrc=", page)
    assert "tiny &lt;model&gt;" in page and "model.layers.1" in page and "d_sae 3" in page
    assert "1 dead" in page
    assert not re.search(r"__[A-Z]+__", page)


# Runs the page's script under node with a stub DOM, then prints what featureHtml gives for every feature.
_NODE_STUB = r"""
const page = require("fs").readFileSync(process.argv[1], "utf8");
const [, data] = page.match(/<script type="application\/json" id="data">([\s\S]*?)<\/script>/);
const [, code] = page.match(/<script>([\s\S]*?)<\/script>/);
const els = {};
const el = id => els[id] ??= {value: id === "sort" ? "max_act" : "", textContent: id === "data" ? data : "",
                               addEventListener() {}};
global.document = {getElementById: el, querySelectorAll: () => [], querySelector: () => null,
                   addEventListener() {}};
global.history = {replaceState() {}};
global.location = {hash: ""};
eval(code + ";console.log(JSON.stringify([el('detail').innerHTML, F.map(featureHtml)]))");
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_script_renders_what_feature_html_renders(tmp_path: Path):
    page = render_dashboard(_analysis(), tmp_path / "dashboard.html")
    run = subprocess.run(["node", "-e", _NODE_STUB, str(page)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    detail, rendered = json.loads(run.stdout)
    assert rendered == [feature_html(f) for f in _analysis()["features"]]
    assert detail == feature_html(_analysis()["features"][2])  # the live feature with the highest max act


def test_notebook_runs(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "dashboard.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit without outputs"
    monkeypatch.setenv("SAE_RUN_DIR", str(run_dir))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError if any cell raised
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("Feature 2" in o.get("data", {}).get("text/html", "") for o in outputs)
    assert (run_dir / "analysis" / "dashboard.html").is_file()
