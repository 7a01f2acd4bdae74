"""The dashboard site in a real browser: Playwright driving the system Chromium over file:// URLs.

Skipped where Playwright or Chromium is missing, except under CI=true, where that fails: `make test` installs
both (Playwright with the dev extra, Chromium through apt), so a missing browser in CI is a broken set-up.
"""

import os
import random
import shutil
from pathlib import Path

import pytest

from sae.site import write_site

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

    page.click('#rows a[href="features/5.html"]')
    page.wait_for_url("**/features/5.html")
    assert page.inner_text("h1") == "Feature 5"
    page.go_back()
    page.wait_for_function("document.querySelectorAll('#rows .row').length > 0")
    assert page.locator('[data-sort="id"]').get_attribute("class") == "on"  # the list's state came back


def test_feature_page_highlights_tokens_and_shows_hostile_text(index: Path, page, tmp_path: Path):
    page.goto((index.parent / "features" / "7.html").as_uri())
    assert page.inner_text("h1") == "Feature 7"
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
    page.wait_for_url("**/features/8.html")
    page.click("ol.near a >> nth=0")
    page.wait_for_url("**/features/9.html")
    page.click('a[rel="prev"]')
    page.wait_for_url("**/features/8.html")
    page.click("text=all features")
    page.wait_for_url("**/index.html*")
    page.wait_for_function("document.querySelectorAll('#rows .row').length > 0")
