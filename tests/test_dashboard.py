"""The dashboard: loading, the notebook's HTML of a feature, and the site (sae.site): its files and links, the
data its pages are drawn from (tests/test_browser.py draws them), reading features.json a feature at a time,
atomic builds and the CLI."""

import html
import json
import math
import re
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import random_analysis

import sae.site
from sae.dashboard import feature_html, load_analysis, top_features
from sae.site import read_features, write_site

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


def _data(path: Path, name: str):
    """The value a data/*.js file sets `window[name]` to."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"window.{name} = ") and text.endswith(";\n")
    return json.loads(text[len(f"window.{name} = ") : -2])


def _chunk(path: Path) -> tuple[int, list[dict]]:
    """The number and features of a data/features-<n>.js: SAE_CHUNK(n, [one JavaScript string a feature])."""
    head, *lines = path.read_text(encoding="utf-8").splitlines()
    n = re.fullmatch(r"SAE_CHUNK\((\d+),\[", head)
    assert n is not None and lines[-1].endswith("]);")
    items = [line.removesuffix(",").removesuffix("]);") for line in lines]
    assert all(item[0] == item[-1] == "'" for item in items)
    escapes = {"n": "\n", "r": "\r"}
    texts = [re.sub(r"\\(.)", lambda m: escapes.get(m[1], m[1]), item[1:-1]) for item in items]
    return int(n[1]), [json.loads(t) for t in texts]


def test_site_files_and_links(tmp_path: Path):
    index = write_site(_with_extras(), tmp_path / "dashboard")
    site = index.parent
    assert index == site / "index.html"
    assert sorted(p.name for p in site.iterdir()) == [
        "data",
        "feature.html",
        "index.html",
        "site.css",
        "site.js",
    ]
    assert sorted(p.name for p in (site / "data").iterdir()) == ["features-0.js", "index.js", "names.js"]
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard"]  # no temporary directory left
    # Every link and script of both pages resolves to a file of the site; nothing is fetched from the network.
    for page in (index, site / "feature.html"):
        parsed = _Parsed(page.read_text(encoding="utf-8"))
        assert parsed.inline_scripts == 0, page
        for link in parsed.links:
            assert not re.match(r"[a-z]+:", link), (page, link)
            assert (page.parent / link.split("#")[0]).resolve().is_file(), (page, link)
    # The list's rows link to feature.html#<id>, its chunks are data/features-<n>.js (built in site.js).
    js = (site / "site.js").read_text()
    assert 'href="feature.html#${esc(f[ID])}"' in js and "s.src = `data/features-${n}.js`" in js


def test_index_header_and_data(tmp_path: Path):
    site = write_site(_with_extras(), tmp_path / "dashboard").parent
    for page in ("index.html", "feature.html"):
        header = "".join(_Parsed((site / page).read_text(encoding="utf-8")).text)
        assert "tiny <model>" in header and "hook model.layers.1" in header and "d_sae 3" in header
        assert "100 tokens" in header and "1 dead (33.3%)" in header
    # Strongest first, the list's first order.
    strong, live, dead = _data(site / "data" / "index.js", "SAE_INDEX")
    # [id, density, max_act, mean_act, top tokens, promoted, snippet tokens, snippet acts %, center, sparkline]
    assert live[:6] == [0, 0.012, 5.0, 2.0, ["</script>", "a"], ["<i>", " Paris"]]
    assert live[6] == [
        "The",
        " cat",
        "</script>",
        "<b>",
        " & co",
    ]  # up to 6 tokens before the center, 2 after
    assert live[7:9] == [[0, 20, 100, 50, 0], 2]
    # Bar heights in px of 16, log scale: counts 900 // (i + 1) for 20 bins.
    logs = [math.log1p(900 // (i + 1)) for i in range(20)]
    assert [int(c, 36) for c in live[9]] == [round(16 * v / logs[0]) for v in logs] and live[9][0] == "g"
    assert dead == [1, 0.0, 0.0, 0.0, [], [], [], [], -1, ""]
    assert strong[4:6] == [["'s"], []] and strong[9] == ""


def test_names_and_chunks_hold_every_feature_as_analysed(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sae.site, "CHUNK", 2)
    analysis = _with_extras()
    site = write_site(analysis, tmp_path / "dashboard").parent
    names = _data(site / "data" / "names.js", "SAE_NAMES")
    assert names == {"chunk": 2, "features": [[0, "</script>"], [1, None], [2, "'s"]]}
    chunks = [_chunk(site / "data" / f"features-{n}.js") for n in (0, 1)]
    assert chunks == [(0, analysis["features"][:2]), (1, analysis["features"][2:])]


def test_index_data_holds_every_feature_of_a_large_analysis(tmp_path: Path):
    """One entry per feature, each with its analysis's values, in the order of max act; every feature's JSON in
    the chunk that names.js points to."""
    analysis = json.loads(random_analysis(tmp_path, 1200).read_text(encoding="utf-8"))
    site = sae.site.build_site(tmp_path).parent
    feats = analysis["features"]
    rows = _data(site / "data" / "index.js", "SAE_INDEX")
    assert len(rows) == len(feats) == 1200
    assert [r[0] for r in rows] == [f["id"] for f in sorted(feats, key=lambda f: (-f["max_act"], f["id"]))]
    by_id = {r[0]: r for r in rows}
    for f in feats:
        top = list(dict.fromkeys(ex["tokens"][ex["center"]] for ex in f["examples"]))
        ex = f["examples"][0] if f["examples"] else {"tokens": [], "acts": [], "center": -1}
        lo = max(0, ex["center"] - 6)
        acts = [round(100 * min(a / f["max_act"], 1.0)) for a in ex["acts"][lo : ex["center"] + 3]]
        up = [t for t, _ in f["top_logits"][:5]]
        assert by_id[f["id"]][:9] == [
            f["id"], float(f"{f['density']:.4g}"), f["max_act"], f["mean_act"], top, up,
            ex["tokens"][lo : ex["center"] + 3], acts, ex["center"] - lo,
        ]  # fmt: skip
        assert len(by_id[f["id"]][9]) == 20
    assert {r[0] for r in rows if r[1] == 0} >= set(range(0, 1200, 50))  # every 50th never fires
    names = _data(site / "data" / "names.js", "SAE_NAMES")
    assert names["features"] == [
        [f["id"], f["examples"][0]["tokens"][f["examples"][0]["center"]] if f["examples"] else None]
        for f in feats
    ]
    C = names["chunk"]
    chunks = sorted(_chunk(p) for p in (site / "data").glob("features-*.js"))
    assert [n for n, _ in chunks] == list(range(-(-len(feats) // C)))
    assert [f for _, part in chunks for f in part] == feats


def test_read_features_streams_any_layout(tmp_path: Path):
    analysis = _with_extras()
    path = tmp_path / "features.json"
    # Indented, `features` before other keys: what a hand-edited file might be.
    path.write_text(json.dumps({"features": analysis["features"], "model": "m"}, indent=1), encoding="utf-8")
    meta: dict = {}
    got = list(read_features(path, meta))
    assert [f for f, _ in got] == analysis["features"] and [json.loads(t) for _, t in got] == analysis[
        "features"
    ]
    assert meta == {"model": "m"}
    path.write_text(' { "k" : 1 , "features" : [ ] } ', encoding="utf-8")
    assert list(read_features(path, meta)) == [] and meta["k"] == 1
    path.write_text(json.dumps({"model": "m"}), encoding="utf-8")
    with pytest.raises(ValueError, match="has no `features`"):
        list(read_features(path, {}))
    text = json.dumps(analysis)
    for broken in (text[: len(text) // 2], text[:-1], text.replace("[{", "[{{", 1), "[]"):
        path.write_text(broken, encoding="utf-8")
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is truncated or corrupt"):
            list(read_features(path, {}))


def test_failed_build_keeps_the_old_site_and_leaves_no_temporary(tmp_path: Path, monkeypatch):
    index = write_site(_analysis(), tmp_path / "dashboard")
    before = index.read_text()
    calls = []
    write_chunk = sae.site._write_chunk

    def fail_on_the_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        write_chunk(*args)

    monkeypatch.setattr(sae.site, "CHUNK", 1)
    monkeypatch.setattr(sae.site, "_write_chunk", fail_on_the_second_chunk)
    with pytest.raises(RuntimeError, match="disk full"):
        write_site(_with_extras(), tmp_path / "dashboard")
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard"]
    assert index.read_text() == before and len(list((tmp_path / "dashboard" / "data").iterdir())) == 3
    monkeypatch.undo()
    write_site(_with_extras(), tmp_path / "dashboard")  # a rebuild replaces the whole site
    assert '"nearest"' in (tmp_path / "dashboard" / "data" / "features-0.js").read_text()
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
        first.stdout.strip() == f"dashboard: {index}" and (run_dir / "dashboard" / "feature.html").is_file()
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
        with urllib.request.urlopen(url.group(1) + "data/features-0.js", timeout=10) as response:
            assert response.read().decode().startswith("SAE_CHUNK(0,")
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
