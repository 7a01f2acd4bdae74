"""The dashboard site in a real browser: Playwright driving the system Chromium over file:// URLs. The feature
pages are drawn here only, by site.js.

Skipped where Playwright or Chromium is missing, except under CI=true, where that fails: `make test` installs
both (Playwright with the dev extra, Chromium through apt), so a missing browser in CI is a broken set-up.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import random_analysis
from test_dashboard import TOKENS, _analysis, _with_extras

from sae.site import build_site, write_site

SCRIPT = "<script>alert(1)</script>"
WORDS = [" the", " cat", " river", " Paris", " 1999", "ing", " and", " of", "\n", " bridge", " sun", " -"]
N_FEATURES = 300


def synthetic_analysis(n: int = N_FEATURES, seed: int = 0) -> dict:
    """`n` features shaped as `sae.analyze.save_analysis` writes them, with the optional histogram, interval and
    nearest fields; every 10th feature is dead, feature 7 fires on `SCRIPT`, feature i's activating token is
    `WORDS[i % len(WORDS)]` (feature 7's is SCRIPT)."""
    rng = random.Random(seed)

    def example(center_token: str, act: float) -> dict:
        tokens = [rng.choice(WORDS) for _ in range(17)]
        tokens[12] = center_token
        acts = [round(act * rng.random(), 3) if rng.random() < 0.3 else 0.0 for _ in tokens]
        acts[12] = act
        return {
            "act": act,
            "row": rng.randrange(1000),
            "pos": rng.randrange(128),
            "tokens": tokens,
            "acts": acts,
            "center": 12,
        }

    features = []
    for i in range(n):
        if i % 10 == 3:
            features.append({"id": i, "density": 0.0, "max_act": 0.0, "mean_act": 0.0, "examples": []})
            continue
        token = SCRIPT if i == 7 else WORDS[i % len(WORDS)]
        max_act = round(rng.uniform(1, 20), 4)
        acts = sorted((round(max_act * rng.uniform(0.3, 1), 4) for _ in range(4)), reverse=True)
        edges = [max_act * j / 20 for j in range(21)]
        features.append(
            {
                "id": i,
                "density": 10 ** rng.uniform(-5, -1),
                "max_act": max_act,
                "mean_act": round(max_act * rng.uniform(0.1, 0.5), 4),
                "examples": [example(token, a) for a in [max_act, *acts[1:]]],
                "top_logits": [[rng.choice(WORDS), round(rng.uniform(0.5, 2), 3)] for _ in range(8)],
                "bottom_logits": [[rng.choice(WORDS), round(-rng.uniform(0.5, 2), 3)] for _ in range(8)],
                "histogram": {"edges": edges, "counts": [int(1000 * 0.7**j) for j in range(20)]},
                "intervals": [
                    {
                        "lo": max_act * j / 3,
                        "hi": max_act * (j + 1) / 3,
                        "count": 10 ** (3 - j),
                        "examples": [example(token, round(max_act * (j + 0.5) / 3, 4))],
                    }
                    for j in range(3)
                ],
                "nearest": [[(i + d) % n, round(0.9 - 0.1 * d, 2)] for d in range(1, 6)],
            }
        )
    return {
        "model": "tiny <model>",
        "hook": "model.layers.2",
        "d_in": 64,
        "d_sae": n,
        "k": 8,
        "arch": "topk",
        "n_tokens": 65536,
        "window": [12, 4],
        "features": features,
    }


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser():
    """Playwright's sync API, or a skip (a failure under CI=true) saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package (pip install -e '.[dev]')"
    else:
        if _chromium():
            return sync_playwright
        missing = "Chromium (`make browser`, part of `make test`, installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {missing} is missing: the browser test must run in CI")
    pytest.skip(f"{missing} is missing")


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    return write_site(synthetic_analysis(), tmp_path_factory.mktemp("site") / "dashboard")


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page that records console errors and uncaught exceptions; the test fails if any occurred."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: problems.append(f"dialog opened: {d.message}"))  # an injected alert()
    yield page
    page.close()
    assert not problems, problems


def _count(page) -> int:
    return int(page.inner_text("#count").split(" of ")[0].replace(",", ""))


def _ids(page) -> list[int]:
    return [int(t.lstrip("#")) for t in page.locator("#rows .row > span:first-child").all_inner_texts()]


def _shown(page, fid: int) -> None:
    """Waits until the feature page shows feature `fid` (its chunk may still be loading)."""
    page.wait_for_function("id => document.querySelector('h1')?.textContent === `Feature ${id}`", arg=fid)


def _screenshot(page, path: Path, keep: str) -> None:
    page.screenshot(path=str(path), full_page=False)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    try:
        shutil.copyfile(path, keep)  # a copy to look at
    except OSError:
        pass


def test_index_searches_sorts_and_opens_a_feature(index: Path, page, tmp_path: Path):
    analysis = synthetic_analysis()
    page.goto(index.as_uri())
    assert page.title().startswith("SAE features · tiny <model>")
    assert _count(page) == N_FEATURES
    assert "30 dead" in page.inner_text("header")
    # Only the rows in view (plus a margin) are in the page.
    assert 20 < page.locator("#rows .row").count() < 80
    # Default order: max activation, strongest first.
    by_max = sorted(analysis["features"], key=lambda f: (-f["max_act"], f["id"]))
    assert _ids(page)[:10] == [f["id"] for f in by_max[:10]]

    # Search by token text: the features whose top or promoted tokens contain "river".
    def hit(f: dict) -> bool:
        tokens = [ex["tokens"][ex["center"]] for ex in f["examples"]] + [
            t for t, _ in f.get("top_logits", [])[:5]
        ]
        return any("river" in t.lower() for t in tokens)

    page.fill("#q", "river")
    expected = sum(hit(f) for f in analysis["features"])
    assert 0 < expected < N_FEATURES and _count(page) == expected
    page.fill("#q", "#123")
    assert _count(page) == 1 and _ids(page) == [123]
    page.fill("#q", "")
    assert _count(page) == N_FEATURES
    page.check("#live")
    assert _count(page) == N_FEATURES - 30
    page.uncheck("#live")

    page.click('[data-sort="density"]')
    by_density = sorted(analysis["features"], key=lambda f: (-f["density"], f["id"]))
    assert _ids(page)[:10] == [f["id"] for f in by_density[:10]]
    page.click('[data-sort="density"]')  # again: ascending, dead features first
    assert _ids(page)[:3] == [3, 13, 23]
    page.click('[data-sort="id"]')
    assert _ids(page)[:5] == [0, 1, 2, 3, 4]
    # Scrolling draws the rows further down.
    page.locator("#list").evaluate("el => el.scrollTop = 250 * 28")
    page.wait_for_function("document.querySelector('#rows').textContent.includes('#260')")
    page.locator("#list").evaluate("el => el.scrollTop = 0")
    page.wait_for_function("document.querySelector('#rows .row span').textContent === '#0'")

    page.fill("#q", "script")
    assert _ids(page) == [7]
    assert SCRIPT in page.inner_text("#rows")  # the token shows as text
    page.fill("#q", "")
    _screenshot(page, tmp_path / "index.png", "/tmp/site_index.png")

    page.click('#rows a[href="feature.html#5"]')
    page.wait_for_url("**/feature.html#5")
    _shown(page, 5)
    page.go_back()
    page.wait_for_function("document.querySelectorAll('#rows .row').length > 0")
    assert page.locator('[data-sort="id"]').get_attribute("class") == "on"  # the list's state came back


def test_feature_page_highlights_tokens_and_shows_hostile_text(index: Path, page, tmp_path: Path):
    page.goto((index.parent / "feature.html").as_uri() + "#7")
    _shown(page, 7)
    assert page.title() == "Feature 7 · tiny <model> · model.layers.2"
    # The alpha of each token's computed background colour (rgb(...) is opaque).
    alphas = page.locator("table.ex .t span").evaluate_all(
        r"els => els.map(e => getComputedStyle(e).backgroundColor.match(/[\d.]+/g)).map(c => +(c[3] ?? 1))"
    )
    assert sum(a > 0 for a in alphas) > 7  # 4 top examples and 3 band samples, each more than its token
    assert alphas[0] < 1 and max(alphas) == 1  # intensity follows the activation, the strongest full
    center = page.locator("table.ex .t span.c").first
    assert center.inner_text() == SCRIPT  # shown as text, not run
    assert center.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"
    assert center.get_attribute("title").startswith("act ")
    assert page.locator("script:not([src])").count() == 0
    assert page.locator("svg.hist rect").count() == 20
    assert page.locator("h3").count() == 3  # interval bands
    assert page.locator("ol.near a").count() == 5
    _screenshot(page, tmp_path / "feature.png", "/tmp/site_feature.png")

    page.keyboard.press("ArrowRight")
    _shown(page, 8)
    page.click("ol.near a >> nth=0")
    _shown(page, 9)
    assert page.url.endswith("/feature.html#9")
    page.click('a[rel="prev"]')
    _shown(page, 8)
    page.go_back()  # each feature shown is a step of the history
    _shown(page, 9)
    page.click("text=all features")
    page.wait_for_url("**/index.html*")
    page.wait_for_function("document.querySelectorAll('#rows .row').length > 0")
    page.goto((index.parent / "feature.html").as_uri() + "#12345")
    assert page.inner_text("h1") == "No feature 12345 in this site"


def _main(page) -> tuple[str, str]:
    """The feature page's main element: its HTML and its text."""
    return page.inner_html("main"), page.locator("main").evaluate("e => e.textContent")


def test_feature_page_escapes_tokens_and_shows_every_section(page, tmp_path: Path):
    site = write_site(_with_extras(), tmp_path / "dashboard").parent
    page.goto((site / "feature.html").as_uri() + "#0")
    _shown(page, 0)
    body, text = _main(page)
    # Hostile tokens arrive as text: no element the analysis did not ask for, the text intact.
    assert page.locator("main b, main i, main img, main script").count() == 0
    for token in ["</script>", "<b>", " & co", '  "x"', "<i>", "<img src=x onerror=alert(1)>"]:
        assert token in text
    assert "tiny <model>" in page.inner_text("header")
    line = page.locator("table.ex td.t").first
    assert line.evaluate("e => e.textContent") == 'The cat</script><b> & co↵  "x"'
    # The tokens it fires on are spans, the activating one boxed; the rest is plain text.
    spans = re.findall(r"<span([^>]*)>([^<]*)</span>", line.inner_html())
    assert spans == [
        (' style="--a:0.20" title="act 1.00"', " cat"),
        (' class="c" style="--a:1.00" title="act 5.00"', "&lt;/script&gt;"),
        (' style="--a:0.50" title="act 2.50"', "&lt;b&gt;"),
    ]
    assert "row 3 · pos 40" in text and "row 7 · pos 2" in text
    assert "density 1.2% (log10 -1.92)" in text and "max act 5.00" in text and "mean act 2.00" in text
    assert "promotes" in text and "+1.25" in text and "suppresses" in text and "-0.75" in text
    assert body.count("<rect ") == 20 and "3,234 activations" in text
    assert "Activation histogram 0.00 … 5.00" in text and "0.25 – 0.5: 450 tokens" in body
    assert "act 0.00 – 2.50" in text and "41 tokens" in text and "act 2.50 – 5.00" in text
    assert text.count("no examples") == 1  # the empty band
    assert '<a href="#2">#2</a>' in body and '<a href="#1">#1</a>' in body and "#99" in text
    assert 'href="#99"' not in body and "cos 0.61" in text and "cos -0.20" in text
    assert page.locator("ol.near .pill").all_inner_texts() == ["'s"]  # #2's strongest token; #1 has none
    assert page.get_attribute('a[rel="next"]', "href") == "#1" and page.locator('a[rel="prev"]').count() == 0


def test_feature_pages_without_the_optional_fields(page, tmp_path: Path):
    site = write_site(_analysis(), tmp_path / "dashboard").parent
    page.goto((site / "feature.html").as_uri() + "#2")
    _shown(page, 2)
    _, text = _main(page)
    for section in ("histogram", "band", "Nearest", "Logit lens"):
        assert section not in text
    assert page.get_attribute('a[rel="prev"]', "href") == "#1" and page.locator('a[rel="next"]').count() == 0
    page.goto((site / "feature.html").as_uri() + "#1")
    _shown(page, 1)
    assert page.get_attribute("body", "class") == "feature dead"
    assert "dead (never fired)" in page.inner_text("main") and "no examples" in page.inner_text("main")
    # Fields in other shapes than analyze writes are left out, as the notebook leaves them out.
    odd = _analysis()
    odd["features"][0] |= {"histogram": {"counts": [1, 2]}, "nearest": 3, "intervals": [{"lo": "x"}, 7]}
    site = write_site(odd, tmp_path / "odd").parent
    page.goto((site / "feature.html").as_uri() + "#0")
    _shown(page, 0)
    _, text = _main(page)
    assert TOKENS[2] in text and "histogram" not in text and "band" not in text and "Nearest" not in text


N_RANDOM = 2500


@pytest.fixture(scope="module")
def random_site(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The site of `N_RANDOM` features of random sparse codes, analysed as analyze.py does, and its features."""
    run_dir = tmp_path_factory.mktemp("random")
    analysis = json.loads(random_analysis(run_dir, N_RANDOM).read_text(encoding="utf-8"))
    return build_site(run_dir), analysis["features"]


def test_a_site_of_thousands_of_features_sorts_searches_pages_and_links(random_site, page):
    index, feats = random_site
    page.goto(index.as_uri())
    assert _count(page) == N_RANDOM
    assert 20 < page.locator("#rows .row").count() < 80  # the rows in view, not N_RANDOM

    def order(key: str, desc: bool, fs: list[dict] = feats) -> list[int]:
        return [f["id"] for f in sorted(fs, key=lambda f: ((-1 if desc else 1) * f[key], f["id"]))]

    # By max activation, strongest first; again, weakest first (the dead ones, by id); again, strongest.
    by_max = order("max_act", True)
    assert _ids(page)[:10] == by_max[:10]
    page.click('[data-sort="max_act"]')
    assert _ids(page)[:10] == order("max_act", False)[:10] and _ids(page)[:3] == [0, 50, 100]
    page.click('[data-sort="max_act"]')
    assert _ids(page)[:10] == by_max[:10]

    # Paging: the rows drawn after a scroll are those of that place in the order.
    page.locator("#list").evaluate("el => el.scrollTop = 2000 * 28")
    page.wait_for_function(f"document.querySelector('#rows').textContent.includes('#{by_max[2000]}')")
    drawn = _ids(page)
    start = by_max.index(drawn[0])
    assert drawn == by_max[start : start + len(drawn)] and start <= 2000 < start + len(drawn)

    # Search by token text, among top tokens and promoted ones.
    def hit(f: dict, q: str) -> bool:
        tokens = [ex["tokens"][ex["center"]] for ex in f["examples"]] + [t for t, _ in f["top_logits"][:5]]
        return any(q in t.lower() for t in tokens)

    page.fill("#q", "q")
    found = [f for f in feats if hit(f, "q")]
    assert 0 < len(found) < N_RANDOM and _count(page) == len(found)
    assert _ids(page)[:10] == order("max_act", True, found)[:10]

    # A link opens that feature's page, whichever chunk holds it.
    fid = _ids(page)[3]
    page.click(f'#rows a[href="feature.html#{fid}"]')
    page.wait_for_url(f"**/feature.html#{fid}")
    _shown(page, fid)
    f = next(f for f in feats if f["id"] == fid)
    assert f"max act {f['max_act']:.2f} · mean act {f['mean_act']:.2f}" in page.inner_text("p.stats")
    assert page.locator("table.ex").first.locator("tr").count() == len(f["examples"])
    assert [int(t.lstrip("#")) for t in page.locator("ol.near a").all_inner_texts()] == [
        i for i, _ in f["nearest"]
    ]
    page.go_back()
    page.wait_for_function("document.querySelectorAll('#rows .row').length > 0")
    assert page.input_value("#q") == "q" and _count(page) == len(found)  # the list as it was
    # The last feature, in the last chunk.
    page.goto(index.parent.joinpath("feature.html").as_uri() + f"#{N_RANDOM - 1}")
    _shown(page, N_RANDOM - 1)
    assert page.locator('a[rel="next"]').count() == 0
