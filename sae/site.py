"""The dashboard site: a searchable index of every feature and a page that shows any of them.

    python -m sae.site runs/demo              # writes runs/demo/dashboard/ unless it is newer than the analysis
    python -m sae.site runs/demo --serve      # ... then serves it on http://127.0.0.1:8000/ (localhost only)

`run_dir/dashboard/` is plain files that open from file:// with no server:

    index.html            header and the feature list: search, sort, hide dead, only the rows in view drawn
    feature.html          every feature's page, by its id: feature.html#1234 shows feature 1234 (statistics,
                          activation histogram, promoted/suppressed tokens, top examples, samples by activation
                          band, nearest features, previous/next)
    data/index.js         the list's columns, one row per feature (`SAE_INDEX`)
    data/names.js         the features in order, each with its strongest token (`SAE_NAMES`): which chunk holds
                          a feature, its previous and next, the names of the nearest features
    data/features-<n>.js  features n * CHUNK to (n + 1) * CHUNK - 1 in that order, each its features.json text
    site.css, site.js     shared by both pages

Data are scripts that set a global, since browsers refuse fetch() from file:// pages; feature.html loads the
chunk of the feature in its URL. A static page per feature does not scale: at 65,536 features (`bench/site.py`)
such pages took 793 MB in 65,540 files and 162 s to build, this layout takes 596 MB in 262 files and 41 s,
most of it reading features.json, which is read one feature at a time. A page is drawn in the browser from its
feature's text, copied into the chunk as read, so the build converts nothing but the index's columns. Pages are
drawn in the classes and styles of `sae.views` (`views.CSS`), as a notebook draws a feature, every piece of
analysis text escaped as it is drawn; the optional analysis fields (`histogram`, `intervals`, `nearest`) are
shown where present and in the shapes `sae.analyze` writes.
"""

import argparse
import functools
import html
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sae import views
from sae.dashboard import analysis_path
from sae.files import read_json

# Features per data/features-<n>.js, the file a feature page loads: 2.2 MB at 50 examples a feature, against
# 9 MB for 1,024, which open in 0.4 s rather than 0.5 s; a 65,536-feature site holds 256 of them.
CHUNK = 256
SNIPPET = (6, 2)  # tokens before and after the activating one in the index's one-line example
TOP_TOKENS = 8  # distinct activating tokens per feature, searchable in the index
UP_TOKENS = 5  # promoted tokens per feature, shown and searchable in the index
# The run's headline metrics in the header, where metrics.json has them: (key, label, format).
HEADLINE = (
    ("fvu", "FVU", ".3f"),
    ("l0", "L0", ".1f"),
    ("loss_recovered", "loss recovered", ".3f"),
    ("absorption_rate", "absorption rate", ".3f"),
)

Features = Iterable[tuple[dict, str]]
"""An analysis's features in order, each with its JSON text."""


def build_site(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes the site of `run_dir`'s analysis into `out` (default `run_dir/dashboard`); returns its index.html.
    Reads features.json one feature at a time (`read_features`)."""
    path = analysis_path(run_dir)
    meta: dict = {}
    out = Path(run_dir) / "dashboard" if out is None else Path(out)
    metrics = Path(run_dir) / "metrics.json"
    headline = read_json(metrics, "metrics file") if metrics.is_file() else {}
    return _replace_dir(out, lambda root: _write(root, meta, read_features(path, meta), headline))


def write_site(analysis: dict, out: str | Path) -> Path:
    """Writes the site of `analysis` (the content of `features.json`) into the directory `out`; returns its
    index.html."""
    meta = {k: v for k, v in analysis.items() if k != "features"}
    features = ((f, _json(f)) for f in analysis["features"])
    return _replace_dir(Path(out), lambda root: _write(root, meta, features))


def _replace_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(tmp)` for a temporary directory beside `out` and renames it onto `out`, so a reader never
    sees half a site and a failed build leaves the previous one as it was; returns its index.html."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"


_SPACE = re.compile(r"[ \t\n\r]*")


def read_features(path: Path, meta: dict) -> Iterator[tuple[dict, str]]:
    """The features of the analysis file `path` (features.json), one at a time, each with its JSON text; the
    file's other keys are put in `meta` as they are read (all of them once the features are exhausted).

    Only one feature's objects are alive at a time: `json.load` of the whole file at 65,536 features holds
    5 GB, and its garbage collections over those millions of objects take longer than the parse itself."""
    text = path.read_text(encoding="utf-8")
    decode = json.JSONDecoder().raw_decode

    def past(i: int, chars: str) -> tuple[str, int]:
        """The character after the whitespace at `i`, which must be one of `chars`, and the position after it
        and the whitespace that follows."""
        i = _skip(text, i)
        if i == len(text) or text[i] not in chars:
            expected = " or ".join(repr(c) for c in chars)
            raise ValueError(f"analysis file {path} is truncated or corrupt: {expected} expected at char {i}")
        return text[i], _skip(text, i + 1)

    seen = False
    try:
        _, i = past(0, "{")
        c = "}" if text.startswith("}", i) else ","
        while c == ",":
            key, i = decode(text, i)
            _, i = past(i, ":")
            if key != "features":
                meta[key], i = decode(text, i)
            else:
                seen = True
                _, i = past(i, "[")
                end = text.startswith("]", i)
                if end:
                    _, i = past(i, "]")
                while not end:
                    f, j = decode(text, i)
                    yield f, text[i:j]
                    sep, i = past(j, ",]")
                    end = sep == "]"
            c, i = past(i, ",}")
    except json.JSONDecodeError as err:
        raise ValueError(f"analysis file {path} is truncated or corrupt: not valid JSON ({err})") from None
    if not seen:
        raise ValueError(f"analysis file {path} has no `features`")


def _skip(text: str, i: int) -> int:
    """The position of the first character at or after `i` that is not JSON whitespace."""
    space = _SPACE.match(text, i)
    return space.end() if space else i


def _write(root: Path, meta: dict, features: Features, metrics: dict | None = None) -> None:
    """Writes the site into the new directory `root`: the chunks as the features stream by, then the index, the
    names and the pages, whose header counts the features and shows the headline `metrics` (metrics.json)."""
    (root / "data").mkdir(parents=True)
    rows: list[list] = []
    names: list[list] = []
    chunk: list[str] = []
    for f, text in features:
        top = _top_tokens(f)
        rows.append(_index_row(f, top))
        names.append([f["id"], top[0] if top else None])
        chunk.append(_js_string(text))  # the browser parses the one it shows
        if len(chunk) == CHUNK:
            _write_chunk(root, len(names) // CHUNK - 1, chunk)
            chunk = []
    if chunk:
        _write_chunk(root, len(names) // CHUNK, chunk)
    summary = _summary(meta, len(rows), sum(row[1] <= 0 for row in rows), metrics or {})
    rows.sort(key=lambda row: (-row[2], row[0]))  # the list's first order, which it then need not sort
    files = {
        "site.css": _CSS,
        "site.js": _JS,
        "index.html": _index_page(meta, summary),
        "feature.html": _feature_page(meta, summary),
        "data/index.js": _data("SAE_INDEX", rows),
        "data/names.js": _data("SAE_NAMES", {"chunk": CHUNK, "features": names}),
    }
    for name, content in files.items():
        (root / name).write_text(content, encoding="utf-8")


def _write_chunk(root: Path, n: int, texts: list[str]) -> None:
    content = f"SAE_CHUNK({n},[\n" + ",\n".join(texts) + "]);\n"
    (root / "data" / f"features-{n}.js").write_text(content, encoding="utf-8")


def _json(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _data(name: str, value: object) -> str:
    """A script setting `window[name]` to `value`, written as JSON (a JSON text is a JavaScript expression)."""
    # Measured at 65,536 features: Chromium runs the index's 17 MB in 0.9 s so, in 1.4 s as JSON.parse('...').
    return f"window.{name} = {_json(value)};\n"


def _js_string(text: str) -> str:
    """`text` as a JavaScript string literal, in single quotes, since JSON is full of double ones."""
    # Features stay strings until one is shown: Chromium loads 1,024 of them, 9 MB, in 0.2 s so, in 0.65 s
    # as the same JSON written as objects. JSON text holds no line terminator but U+2028 and U+2029,
    # allowed in a literal since ES2019, and newlines and returns where it is indented.
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped}'"


def _top_tokens(f: dict) -> list[str]:
    """The distinct tokens a feature fires hardest on, from its top examples, strongest first."""
    tokens = dict.fromkeys(ex["tokens"][ex["center"]] for ex in f["examples"])
    return list(tokens)[:TOP_TOKENS]


def _index_row(f: dict, top: list[str]) -> list:
    """[id, density, max_act, mean_act, top tokens, promoted tokens, snippet tokens, snippet activations
    (percent of max_act), snippet's activating position, sparkline]: one row of `SAE_INDEX`, given the
    feature's top tokens (`_top_tokens`)."""
    tokens: list[str] = []
    acts: list[int] = []
    center = -1
    if f["examples"]:
        ex = f["examples"][0]
        lo, hi = max(0, ex["center"] - SNIPPET[0]), ex["center"] + SNIPPET[1] + 1
        tokens = ex["tokens"][lo:hi]
        acts = [round(100 * views.alpha(a, f["max_act"])) for a in ex["acts"][lo:hi]]
        center = ex["center"] - lo
    up = [t for t, _ in f.get("top_logits", [])][:UP_TOKENS]
    density = float(f"{f['density']:.4g}")
    return [
        f["id"],
        density,
        f["max_act"],
        f["mean_act"],
        top,
        up,
        tokens,
        acts,
        center,
        _spark(f.get("histogram")),
    ]


def _spark(hist: object) -> str:
    """The index's sparkline of a histogram {"counts": [n], ...}: the height of each bar in px of 16 on a log
    scale, as `views.histogram` draws it, a base-36 digit each; "" without counts. The counts themselves would
    make a third of the index's data, for nothing the sparkline can show."""
    counts = hist.get("counts") if isinstance(hist, dict) else None
    if not (isinstance(counts, list) and counts and all(isinstance(c, int | float) for c in counts)):
        return ""
    logs = [math.log1p(max(c, 0)) for c in counts]
    top = max(logs) or 1.0
    return "".join("0123456789abcdefg"[round(16 * v / top)] for v in logs)


def _summary(meta: dict, n: int, n_dead: int, metrics: dict) -> str:
    """The line atop every page: model, hook, SAE, tokens analysed, dead features, and those of the `HEADLINE`
    metrics that `metrics` holds as numbers."""
    a, esc = meta, html.escape
    numbers = "".join(
        f" · {label} {v:{fmt}}"
        for key, label, fmt in HEADLINE
        if isinstance(v := metrics.get(key), int | float) and not isinstance(v, bool) and math.isfinite(v)
    )
    return (
        f"<strong>{esc(str(a['model']))}</strong> · hook {esc(str(a['hook']))}"
        f" · {esc(str(a.get('arch', 'topk')))} SAE, d_sae {a['d_sae']:,} (d_in {a['d_in']}, k {a['k']})"
        f" · {a['n_tokens']:,} tokens · {n_dead:,} dead ({n_dead / max(n, 1):.1%}){numbers}"
    )


def _head(title: str) -> str:
    return (
        '<!doctype html>\n<html lang="en" class="sae"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="site.css"></head>\n'
    )


def _index_page(meta: dict, summary: str) -> str:
    sorts = [("id", "id"), ("density", "density"), ("max_act", "max act"), ("mean_act", "mean act")]
    buttons = "".join(f'<button data-sort="{key}">{label}</button>' for key, label in sorts)
    return (
        _head(f"SAE features · {meta['model']} · {meta['hook']}")
        + f'<body class="index">\n<header>{summary}</header>\n'
        '<div id="controls"><input id="q" type="search" autocomplete="off" autofocus'
        ' placeholder="feature id, or text of its top or promoted tokens  ( / )">'
        '<label><input id="live" type="checkbox"> hide dead</label><span id="count"></span></div>\n'
        f'<div class="row head">{buttons}<span>histogram</span><span>top example</span>'
        "<span>promotes</span></div>\n"
        '<div id="list"><div id="rows"></div></div>\n'
        "<noscript>The list needs JavaScript, as the feature pages do.</noscript>\n"
        '<script src="data/index.js"></script><script src="site.js"></script>\n</body></html>\n'
    )


def _feature_page(meta: dict, summary: str) -> str:
    """feature.html, which site.js fills with the feature named in its URL's fragment."""
    title = f"{meta['model']} · {meta['hook']}"
    return (
        _head(f"SAE feature · {title}") + f'<body class="feature" data-title="{html.escape(title)}">\n'
        f'<header><nav class="pn"><a href="index.html">all features</a></nav>{summary}</header>\n'
        '<main id="feature"><noscript>Feature pages are drawn by JavaScript.</noscript></main>\n'
        '<script src="data/names.js"></script><script src="site.js"></script>\n</body></html>\n'
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m sae.site RUN_DIR [--serve [PORT]] [--rebuild]`."""
    parser = argparse.ArgumentParser(prog="python -m sae.site", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding analysis/features.json")
    parser.add_argument(
        "--serve",
        nargs="?",
        const=8000,
        type=int,
        metavar="PORT",
        help="then serve the site on http://127.0.0.1:PORT/ (default 8000; 0 picks a free port)",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="build even if the site is newer than the analysis"
    )
    args = parser.parse_args(argv)
    index = args.run_dir / "dashboard" / "index.html"
    analysis = args.run_dir / "analysis" / "features.json"
    if (
        args.rebuild
        or not index.is_file()
        or not analysis.is_file()
        or index.stat().st_mtime < analysis.stat().st_mtime
    ):
        try:
            index = build_site(args.run_dir)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
        print(f"dashboard: {index}", flush=True)
    else:
        print(f"dashboard: {index} (newer than the analysis; --rebuild rebuilds it)", flush=True)
    if args.serve is not None:
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(index.parent))
        with ThreadingHTTPServer(("127.0.0.1", args.serve), handler) as server:
            print(f"serving http://127.0.0.1:{server.server_port}/ (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass


# Shared by index.html and feature.html: the fragments' rules (`views.CSS`), then the pages' own.
_CSS = (
    views.CSS
    + """\
body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#222}
header{padding:8px 14px;background:#2b2b2b;color:#ddd}
header strong{color:#fff}
header a{color:#9cf}
a{color:#0660c0;text-decoration:none}
a:hover{text-decoration:underline}

body.index{display:flex;flex-direction:column;height:100vh}
#controls{display:flex;gap:14px;align-items:center;padding:8px 14px;border-bottom:1px solid #ddd}
#q{flex:0 1 32em;padding:4px 8px}
#count{color:#888}
.row{display:grid;grid-template-columns:5em 5.5em 5em 5.5em 90px minmax(0,1fr) minmax(0,18em);gap:12px;
     align-items:center;height:28px;padding:0 14px;box-sizing:border-box;color:inherit;
     font-variant-numeric:tabular-nums}
.row>span{overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.row>:nth-child(2),.row>:nth-child(3),.row>:nth-child(4){text-align:right}
.head{border-bottom:1px solid #ddd;font-weight:600;height:32px;white-space:nowrap}
#list,.head{overflow-y:auto;scrollbar-gutter:stable}  /* header columns line up with the rows' */
.head button{all:unset;cursor:pointer;text-align:right}
.head button:first-child{text-align:left}
.head button.on{color:#c60}
.head button.on::after{content:" " attr(data-dir)}
#list{flex:1}
#rows{position:relative}
#rows .row{position:absolute;left:0;right:0}
#rows .row:hover{background:#f4f4f4;text-decoration:none}
.row.dead{color:#bbb}
.spark{display:block}
.spark rect{fill:#e08a1e}

body.feature main{max-width:1200px;padding:4px 20px 40px}
body.dead main{color:#999}
nav.pn{float:right}
"""
)

_JS = r"""// Shared by index.html and feature.html (sae/site.py).
// The index draws the feature list from SAE_INDEX (data/index.js): search, sort, hide dead features. Every row
// has the same height, so only the rows in view are in the page, and each order is sorted once: a search or a
// scroll at 65,536 features filters or slices an array.
// feature.html#ID draws feature ID from its chunk of data/features-N.js, which it loads as a script; SAE_NAMES
// (data/names.js) says which chunk that is. The arrow keys go to the previous and next feature.
"use strict";
(() => {
  const $ = id => document.getElementById(id);
  const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"};
  const esc = s => String(s).replace(/[&<>"']/g, c => ESC[c]);
  const token = s => esc(String(s).replace(/\n/g, "↵").replace(/\t/g, "⇥"));  // as views.token_text
  const num = x => typeof x === "number";
  const int = x => x.toLocaleString("en-US");
  const g3 = x => String(+x.toPrecision(3));  // Python's {:.3g}, but for the exponent's form

  if (window.SAE_INDEX) index(window.SAE_INDEX);
  else if (window.SAE_NAMES) feature(window.SAE_NAMES);

  function index(F) {
    const ROW = 28;  // px, as .row's height in site.css
    const ID = 0, DENSITY = 1, MAX = 2, MEAN = 3, TOP = 4, UP = 5, EX = 6, EA = 7, EC = 8, SPARK = 9, TEXT = 10;
    const COLUMN = {id: ID, density: DENSITY, max_act: MAX, mean_act: MEAN};
    const FIRST_DESC = {id: false, density: true, max_act: true, mean_act: true};
    const state = {q: "", sort: "max_act", desc: true, live: false};
    const orders = {"max_act true": F};  // "key desc" -> the rows in that order, ties by id; index.js is in this
    let shown = [], drawn = "";

    function ordered() {
      const c = COLUMN[state.sort], sign = state.desc ? -1 : 1, name = `${state.sort} ${state.desc}`;
      orders[name] ||= F.slice().sort((a, b) => sign * (a[c] - b[c]) || a[ID] - b[ID]);
      return orders[name];
    }
    // NUL between tokens: a query never matches across two of them.
    const text = f => f[TEXT] ??= f[TOP].concat(f[UP]).join("\0").toLowerCase();
    function spark(h) {
      if (!h) return "";
      const w = 60 / h.length, bars = [...h].map((c, i) => {
        const y = parseInt(c, 36);
        return `<rect x="${(i * w).toFixed(1)}" y="${16 - y}" width="${(w - 0.5).toFixed(1)}" height="${y}"/>`;
      });
      return `<svg class="spark" viewBox="0 0 60 16" width="60" height="16">${bars.join("")}</svg>`;
    }
    function snippet(f) {
      return f[EX].map((t, i) => `<span${i === f[EC] ? ' class="c"' : ""}` +
                                 `${f[EA][i] ? ` style="--a:${f[EA][i] / 100}"` : ""}>${token(t)}</span>`)
                  .join("");
    }
    function row(f, i) {
      const pct = f[DENSITY] > 0 ? +(100 * f[DENSITY]).toPrecision(2) + "%" : "dead";
      return `<a class="row${f[DENSITY] > 0 ? "" : " dead"}" href="feature.html#${esc(f[ID])}" ` +
             `style="top:${i * ROW}px"><span>#${esc(f[ID])}</span><span>${pct}</span>` +
             `<span>${f[MAX].toFixed(2)}</span><span>${f[MEAN].toFixed(2)}</span>` +
             `<span>${spark(f[SPARK])}</span><span class="t">${snippet(f)}</span>` +
             `<span class="up">${f[UP].map(t => `<span class="pill">${token(t)}</span>`).join(" ")}</span></a>`;
    }
    function draw(force) {
      const list = $("list");
      const first = Math.max(0, Math.floor(list.scrollTop / ROW) - 10);
      const last = Math.min(shown.length, Math.ceil((list.scrollTop + list.clientHeight) / ROW) + 10);
      if (!force && drawn === `${first}:${last}`) return;
      drawn = `${first}:${last}`;
      $("rows").innerHTML = shown.slice(first, last).map((f, i) => row(f, first + i)).join("");
    }
    function refresh() {
      const q = state.q.trim().toLowerCase(), id = q.replace(/^#/, "");
      shown = ordered();
      if (q || state.live) {
        shown = shown.filter(f => (!state.live || f[DENSITY] > 0) &&
                                  (!q || String(f[ID]) === id || text(f).includes(q)));
      }
      $("count").textContent = `${int(shown.length)} of ${int(F.length)} features`;
      $("rows").style.height = `${shown.length * ROW}px`;
      document.querySelectorAll("[data-sort]").forEach(b => {
        b.classList.toggle("on", b.dataset.sort === state.sort);
        b.dataset.dir = state.desc ? "↓" : "↑";
      });
      draw(true);
      save();
    }
    // The state lives in the URL's fragment, so Back from a feature page returns to the same list.
    function save() {
      const p = new URLSearchParams({sort: state.sort, dir: state.desc ? "desc" : "asc"});
      if (state.q) p.set("q", state.q);
      if (state.live) p.set("live", "1");
      const at = Math.floor($("list").scrollTop / ROW);
      if (at) p.set("at", at);
      history.replaceState(null, "", `#${p}`);
    }
    function load() {
      const p = new URLSearchParams(location.hash.slice(1));
      if (Object.hasOwn(FIRST_DESC, p.get("sort"))) state.sort = p.get("sort");
      state.desc = p.has("dir") ? p.get("dir") === "desc" : FIRST_DESC[state.sort];
      state.q = p.get("q") || "";
      state.live = p.get("live") === "1";
      $("q").value = state.q;
      $("live").checked = state.live;
      refresh();
      $("list").scrollTop = (+p.get("at") || 0) * ROW;
      draw(true);
    }

    $("q").addEventListener("input", () => { state.q = $("q").value; $("list").scrollTop = 0; refresh(); });
    $("q").addEventListener("keydown", e => {
      if (e.key === "Enter" && shown.length) location.href = `feature.html#${shown[0][ID]}`;
    });
    $("live").addEventListener("change", () => { state.live = $("live").checked; refresh(); });
    document.querySelectorAll("[data-sort]").forEach(b => b.addEventListener("click", () => {
      const key = b.dataset.sort;
      state.desc = key === state.sort ? !state.desc : FIRST_DESC[key];
      state.sort = key;
      refresh();
    }));
    $("list").addEventListener("scroll", () => requestAnimationFrame(() => draw(false)));
    $("rows").addEventListener("click", save);  // before the link is followed
    window.addEventListener("resize", () => draw(true));
    document.addEventListener("keydown", e => {
      if (e.key === "/" && document.activeElement !== $("q")) { e.preventDefault(); $("q").focus(); }
    });
    load();
    // Every row's search text, in slices after the first draw: at 65,536 features it takes 0.4 s, which
    // neither the first draw nor the first search then waits for.
    let prepared = 0;
    (function prepare() {
      for (const end = Math.min(prepared + 4096, F.length); prepared < end; prepared++) text(F[prepared]);
      if (prepared < F.length) setTimeout(prepare);
    })();
  }

  // A feature's page, drawn as sae.views draws it for a notebook but for a page: only the tokens it fires on
  // shaded, a histogram chart, the nearest features linked and named. Optional fields in other shapes than
  // those sae.analyze writes are left out, as views leaves them out.
  function feature({chunk: C, features: list}) {
    const at = new Map(list.map(([id], i) => [id, i]));  // id -> place in the site's order
    const chunks = {};  // chunk number -> its features' JSON texts
    const main = $("feature");
    window.SAE_CHUNK = (n, texts) => { chunks[n] = texts; show(); };

    function show() {
      const h = location.hash.slice(1), i = /^\d+$/.test(h) ? at.get(+h) : undefined;
      if (i === undefined) {
        main.innerHTML = `<h1>${h ? `No feature ${esc(h)} in this site` : "No feature chosen"}</h1>` +
          `<p>feature.html#ID shows feature ID: pick one from <a href="index.html">the list</a>.</p>`;
        return;
      }
      const n = Math.floor(i / C);
      if (chunks[n]) draw(JSON.parse(chunks[n][i % C]), i);
      else if (!document.querySelector(`script[data-chunk="${n}"]`)) {
        const s = document.createElement("script");
        s.src = `data/features-${n}.js`;
        s.dataset.chunk = n;
        s.onerror = () => { main.innerHTML = `<h1>data/features-${n}.js is missing: rebuild the site</h1>`; };
        document.head.append(s);
      }
    }
    function draw(f, i) {
      const link = (j, label, rel) => j >= 0 && j < list.length ?
        `<a rel="${rel}" href="#${esc(list[j][0])}">${label.replace("ID", esc(list[j][0]))}</a>` : "";
      document.querySelector("nav.pn").innerHTML = [link(i - 1, "← #ID", "prev"),
        '<a href="index.html">all features</a>', link(i + 1, "#ID →", "next")].filter(Boolean).join(" · ");
      document.body.classList.toggle("dead", !(f.density > 0));
      document.title = `Feature ${f.id} · ${document.body.dataset.title}`;
      main.innerHTML = body(f);
      window.scrollTo(0, 0);
    }

    const alpha = (a, max) => max > 0 ? Math.min(Math.max(a / max, 0), 1) : 0;
    const signed = v => (v >= 0 ? "+" : "") + v.toFixed(2);
    const isExample = x => x && typeof x === "object" && ["act", "row", "pos", "center"].every(k => num(x[k]))
      && Array.isArray(x.tokens) && Array.isArray(x.acts) && x.tokens.length === x.acts.length;
    const list_ = x => Array.isArray(x) ? x : [];

    function body(f) {
      const max = f.max_act;
      return [stats(f), histogram(f.histogram), logits(f),
              `<h2>Top activations</h2>${examples(list_(f.examples).filter(isExample), max)}`,
              bands(f.intervals, max), nearest(f.nearest)].filter(Boolean).join("\n");
    }
    function stats(f) {
      const d = f.density > 0 ? `density ${g3(100 * f.density)}% (log10 ${Math.log10(f.density).toFixed(2)})`
                              : "dead (never fired)";
      return `<h1>Feature ${esc(f.id)}</h1><p class="stats">${d} · max act ${f.max_act.toFixed(2)}` +
             ` · mean act ${f.mean_act.toFixed(2)}</p>`;
    }
    // Tokens the feature fires on are spans with their activation as background (--a, a fraction of max act)
    // and on hover, the activating one is boxed; the others stay plain text, which keeps the page small.
    function marks(ex, max) {
      return ex.tokens.map((t, i) => {
        let attrs = i === ex.center ? ' class="c"' : "";
        const a = ex.acts[i];
        if (a > 0) attrs += ` style="--a:${alpha(a, max).toFixed(2)}" title="act ${a.toFixed(2)}"`;
        return attrs ? `<span${attrs}>${token(t)}</span>` : token(t);
      }).join("");
    }
    function examples(exs, max) {
      if (!exs.length) return '<p class="muted">no examples</p>';
      const rows = exs.map(ex => `<tr><td class="v">${ex.act.toFixed(2)}</td>` +
        `<td class="t">${marks(ex, max)}</td><td class="p">row ${ex.row} · pos ${ex.pos}</td></tr>`);
      return `<table class="ex">${rows.join("")}</table>`;
    }
    // Heights on a log scale, since counts fall by orders of magnitude from the weakest bin to the strongest.
    function histogram(h) {
      const counts = h && h.counts, edges = h && h.edges;
      if (!Array.isArray(counts) || !counts.length || !counts.every(num)) return "";
      if (!Array.isArray(edges) || edges.length !== counts.length + 1 || !edges.every(num)) return "";
      const top = Math.max(...counts.map(Math.log1p)) || 1, W = 480, H = 90, step = W / counts.length;
      const bars = counts.map((c, i) => {
        const y = Math.log1p(c) / top;
        return `<rect x="${(i * step).toFixed(1)}" y="${(H * (1 - y)).toFixed(1)}" ` +
               `width="${(step - 1).toFixed(1)}" height="${(H * y).toFixed(1)}">` +
               `<title>${g3(edges[i])} – ${g3(edges[i + 1])}: ${int(c)} tokens</title></rect>`;
      });
      return `<h2>Activation histogram ${edges[0].toFixed(2)} … ${edges[edges.length - 1].toFixed(2)} ` +
             `<small>(log scale)</small></h2><svg class="hist" viewBox="0 0 ${W} ${H}" width="${W}" ` +
             `height="${H}" role="img" aria-label="activation histogram">${bars.join("")}</svg>` +
             `<p class="muted">${int(counts.reduce((a, b) => a + b, 0))} activations</p>`;
    }
    function logits(f) {
      const pills = (label, pairs, cls) => {
        const ok = list_(pairs).filter(p => Array.isArray(p) && typeof p[0] === "string" && num(p[1]));
        return ok.length ? `<p class="${cls}"><span class="muted">${label}</span> ` + ok.map(([t, v]) =>
          `<span class="pill">${token(t)} <small>${signed(v)}</small></span>`).join(" ") + "</p>" : "";
      };
      const parts = pills("promotes", f.top_logits, "up") + pills("suppresses", f.bottom_logits, "down");
      return parts && `<h2>Logit lens</h2>${parts}`;
    }
    function bands(intervals, max) {
      const valid = list_(intervals).filter(b => b && typeof b === "object" && num(b.lo) && num(b.hi));
      const parts = valid.sort((a, b) => b.lo - a.lo).map(b => {
        const exs = list_(b.examples).filter(isExample), count = num(b.count) ? b.count : 0;
        if (!count && !exs.length) return "";
        const head = `act ${b.lo.toFixed(2)} – ${b.hi.toFixed(2)}` + (count ? ` · ${int(count)} tokens` : "");
        return `<h3>${head}</h3>${examples(exs, max)}`;
      }).join("");
      return parts && `<h2>Samples by activation band</h2>${parts}`;
    }
    function nearest(pairs) {
      const valid = list_(pairs).filter(p => Array.isArray(p) && p.length === 2 && p.every(num));
      const items = valid.map(([id, cos]) => {
        const j = at.get(Math.trunc(id)), name = j === undefined ? null : list[j][1];
        const link = j === undefined ? `#${Math.trunc(id)}` : `<a href="#${esc(id)}">#${esc(id)}</a>`;
        return `<li>${link}${name === null ? "" : ` <span class="pill">${token(name)}</span>`}` +
               ` <small>cos ${cos.toFixed(2)}</small></li>`;
      });
      return items.length ? `<h2>Nearest features <small>(decoder cosine)</small></h2><ol class="near">` +
                            `${items.join("")}</ol>` : "";
    }

    window.addEventListener("hashchange", show);
    document.addEventListener("keydown", e => {
      if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
      const link = document.querySelector({ArrowLeft: 'a[rel="prev"]', ArrowRight: 'a[rel="next"]'}[e.key]);
      if (link) location.href = link.href;
    });
    show();
  }
})();
"""


if __name__ == "__main__":
    main()
