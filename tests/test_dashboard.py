"""The dashboard: loading, the notebook's HTML of a feature, and the site (sae.site): its files and links,
escaping of hostile tokens, the optional analysis fields, atomic builds and the CLI."""

import html
import json
import re
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

import sae.site
from sae.dashboard import feature_html, load_analysis, top_features
from sae.site import write_site

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


def _with_extras() -> dict:
    """`_analysis()` with the optional fields on feature 0 only: a histogram, interval samples, neighbours."""
    analysis = _analysis()
    f = analysis["features"][0]
    f["histogram"] = {"edges": [0.25 * i for i in range(21)], "counts": [900 // (i + 1) for i in range(20)]}
    band = {
        "act": 1.0,
        "row": 9,
        "pos": 5,
        "tokens": ["x", "<img src=x onerror=alert(1)>"],
        "acts": [0, 1.0],
        "center": 1,
    }
    f["intervals"] = [
        {"lo": 0.0, "hi": 2.5, "count": 41, "examples": [band]},
        {"lo": 2.5, "hi": 5.0, "count": 3, "examples": []},
    ]
    f["nearest"] = [[2, 0.61], [1, -0.2], [99, 0.1]]  # 99: not in the analysis, shown without a link
    analysis["intervals"] = [[0.0, 0.5], [0.5, 1.0]]
    return analysis


class _Parsed(HTMLParser):
    """The tags, links and text of a page, as a browser's parser sees them."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.inline_scripts = 0
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("href", "src") if attrs.get(k)]
        self.inline_scripts += tag == "script" and "src" not in attrs

    def handle_data(self, data):
        self.text.append(data)


def _index_data(site: Path) -> dict:
    text = (site / "index-data.js").read_text(encoding="utf-8")
    assert text.startswith("window.SAE_INDEX = ") and text.endswith(";\n")
    return json.loads(text[len("window.SAE_INDEX = ") : -2])


def test_site_has_an_index_and_one_page_per_feature(tmp_path: Path):
    index = write_site(_with_extras(), tmp_path / "dashboard")
    site = index.parent
    assert index == site / "index.html"
    assert sorted(p.name for p in site.iterdir()) == [
        "features",
        "index-data.js",
        "index.html",
        "site.css",
        "site.js",
    ]
    assert sorted(p.name for p in (site / "features").iterdir()) == ["0.html", "1.html", "2.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard"]  # no temporary directory left
    # Every link and script of every page resolves to a file of the site; nothing is fetched from the network.
    pages = [index, *(site / "features").iterdir()]
    for page in pages:
        parsed = _Parsed(page.read_text(encoding="utf-8"))
        assert parsed.inline_scripts == 0, page
        for link in parsed.links:
            assert not re.match(r"[a-z]+:", link), (page, link)
            assert (page.parent / link.split("#")[0]).resolve().is_file(), (page, link)
    # The list's rows link to features/<id>.html (built in site.js): one row per page.
    rows = _index_data(site)["features"]
    assert [row[0] for row in rows] == [0, 1, 2]
    assert "features/${f.id}.html" in (site / "site.js").read_text()


def test_index_header_and_data(tmp_path: Path):
    site = write_site(_with_extras(), tmp_path / "dashboard").parent
    header = "".join(_Parsed((site / "index.html").read_text(encoding="utf-8")).text)
    assert "tiny <model>" in header and "hook model.layers.1" in header and "d_sae 3" in header
    assert "100 tokens" in header and "1 dead (33.3%)" in header
    live, dead, strong = _index_data(site)["features"]
    # [id, density, max_act, mean_act, top tokens, promoted, snippet tokens, snippet acts %, center, histogram]
    assert live[:6] == [0, 0.012, 5.0, 2.0, ["</script>", "a"], ["<i>", " Paris"]]
    assert live[6] == [
        "The",
        " cat",
        "</script>",
        "<b>",
        " & co",
    ]  # up to 6 tokens before the center, 2 after
    assert live[7:9] == [[0, 20, 100, 50, 0], 2]
    assert live[9] == _with_extras()["features"][0]["histogram"]["counts"]
    assert dead == [1, 0.0, 0.0, 0.0, [], [], [], [], -1, None]
    assert strong[4:6] == [["'s"], []] and strong[9] is None


def test_feature_page_escapes_tokens_and_shows_every_section(tmp_path: Path):
    site = write_site(_with_extras(), tmp_path / "dashboard").parent
    page = (site / "features" / "0.html").read_text(encoding="utf-8")
    parsed = _Parsed(page)
    # Hostile tokens arrive as text: no element the analysis did not ask for, the text intact.
    assert {"b", "i", "img"}.isdisjoint(parsed.tags) and parsed.tags.count("script") == 1
    text = "".join(parsed.text)
    for token in [
        "</script>",
        "<b>",
        " & co",
        '  "x"',
        "<i>",
        "<img src=x onerror=alert(1)>",
        "tiny <model>",
    ]:
        assert token in text
    line = re.findall(r'<td class="t">(.*?)</td>', page)[0]
    assert html.unescape(re.sub(r"<[^>]*>", "", line)) == 'The cat</script><b> & co↵  "x"'
    # The tokens it fires on are spans, the activating one boxed; the rest is plain text.
    spans = re.findall(r"<span([^>]*)>([^<]*)</span>", line)
    assert spans == [
        (' style="--a:0.20" title="act 1.00"', " cat"),
        (' class="c" style="--a:1.00" title="act 5.00"', "&lt;/script&gt;"),
        (' style="--a:0.50" title="act 2.50"', "&lt;b&gt;"),
    ]
    assert "row 3 · pos 40" in text and "row 7 · pos 2" in text
    assert "Feature 0" in text and "density 1.2% (log10 -1.92)" in text and "max act 5.00" in text
    assert "promotes" in text and "+1.25" in text and "suppresses" in text and "-0.75" in text
    assert page.count("<rect ") == 20 and "3,234 activations" in text
    assert "act 0.00 – 2.50" in text and "41 tokens" in text and "act 2.50 – 5.00" in text
    assert text.count("no examples") == 1  # the empty band
    assert '<a href="2.html">#2</a>' in page and '<a href="1.html">#1</a>' in page and "#99" in text
    assert 'href="99.html"' not in page and "cos 0.61" in text and "cos -0.20" in text
    assert 'rel="next" href="1.html"' in page and 'rel="prev"' not in page


def test_feature_pages_without_the_optional_fields(tmp_path: Path):
    site = write_site(_analysis(), tmp_path / "dashboard").parent
    strong = (site / "features" / "2.html").read_text(encoding="utf-8")
    for section in ("histogram", "band", "Nearest", "Logit lens"):
        assert section not in strong
    assert 'rel="prev" href="1.html"' in strong and 'rel="next"' not in strong
    dead = (site / "features" / "1.html").read_text(encoding="utf-8")
    assert '<body class="feature dead">' in dead and "dead (never fired)" in dead and "no examples" in dead


def test_failed_build_keeps_the_old_site_and_leaves_no_temporary(tmp_path: Path, monkeypatch):
    index = write_site(_analysis(), tmp_path / "dashboard")
    before = index.read_text()
    calls = []

    def fail_on_the_second_page(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return "<p>page</p>"

    monkeypatch.setattr(sae.site, "_feature_page", fail_on_the_second_page)
    with pytest.raises(RuntimeError, match="disk full"):
        write_site(_with_extras(), tmp_path / "dashboard")
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard"]
    assert index.read_text() == before and len(list((tmp_path / "dashboard" / "features").iterdir())) == 3
    monkeypatch.undo()
    write_site(_with_extras(), tmp_path / "dashboard")  # a rebuild replaces the whole site
    assert "Nearest features" in (tmp_path / "dashboard" / "features" / "0.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard"]


def _site_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae.site", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_builds_when_needed_and_serves_on_localhost(run_dir: Path):
    first = _site_cli(str(run_dir))
    assert first.returncode == 0, first.stderr
    index = run_dir / "dashboard" / "index.html"
    assert (
        first.stdout.strip() == f"dashboard: {index}"
        and (run_dir / "dashboard" / "features" / "2.html").is_file()
    )
    again = _site_cli(str(run_dir))
    assert again.returncode == 0 and "newer than the analysis" in again.stdout
    assert _site_cli(str(run_dir), "--rebuild").stdout.strip() == f"dashboard: {index}"

    server = subprocess.Popen(
        [sys.executable, "-m", "sae.site", str(run_dir), "--serve", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # dashboard: ...
        url = re.search(r"serving (http://127\.0\.0\.1:\d+/)", server.stdout.readline())
        assert url is not None
        with urllib.request.urlopen(url.group(1) + "features/0.html", timeout=10) as response:
            assert "Feature 0" in response.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_cli_without_an_analysis_says_what_to_run(tmp_path: Path):
    proc = _site_cli(str(tmp_path))
    assert proc.returncode == 1 and "analyze.py run_dir=" in proc.stderr


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
