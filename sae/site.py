"""The dashboard site: a searchable index of every feature and one static page per feature.

    python -m sae.site runs/demo              # writes runs/demo/dashboard/ unless it is newer than the analysis
    python -m sae.site runs/demo --serve      # ... then serves it on http://127.0.0.1:8000/ (localhost only)

`run_dir/dashboard/` is plain files that open from file:// with no server:

    index.html          header and the feature list: search, sort, hide dead, only the rows in view drawn
    index-data.js       the list's data as a script setting `SAE_INDEX` (browsers refuse fetch() from file://)
    features/<id>.html  one page per feature: statistics, activation histogram, promoted/suppressed tokens,
                        top examples, samples by activation band, nearest features, previous/next
    site.css, site.js   shared by every page

Feature pages are HTML rendered here, their body by `sae.views` as notebooks draw it, so they read without
JavaScript and token text reaches the browser only escaped; the index is drawn in the browser from
`index-data.js`, escaping as it goes. The optional analysis fields (`histogram`, `intervals`, `nearest`) are
shown where present.
"""

import argparse
import functools
import html
import json
import os
import shutil
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sae import views
from sae.dashboard import load_analysis

SNIPPET = (6, 2)  # tokens before and after the activating one in the index's one-line example
TOP_TOKENS = 8  # distinct activating tokens per feature, searchable in the index
UP_TOKENS = 5  # promoted tokens per feature, shown and searchable in the index


def build_site(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes the site of `run_dir`'s analysis into `out` (default `run_dir/dashboard`); returns its index.html."""
    return write_site(load_analysis(run_dir), Path(run_dir) / "dashboard" if out is None else Path(out))


def write_site(analysis: dict, out: str | Path) -> Path:
    """Writes the site of `analysis` (the content of `features.json`) into the directory `out`; returns its
    index.html. The site is built in a temporary directory beside `out` and renamed onto it, so a reader never
    sees half a site and a failed build leaves the previous one as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, analysis)
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


def _write(root: Path, analysis: dict) -> None:
    feats = analysis["features"]
    (root / "features").mkdir(parents=True)
    for name, text in (("site.css", _CSS), ("site.js", _JS), ("index.html", _index_page(analysis))):
        (root / name).write_text(text, encoding="utf-8")
    data = {"features": [_index_row(f) for f in feats]}
    (root / "index-data.js").write_text(f"window.SAE_INDEX = {_json(data)};\n", encoding="utf-8")
    summary = _summary(analysis)
    first_token = {f["id"]: _top_tokens(f)[:1] for f in feats}  # names the nearest features on each page
    for i, f in enumerate(feats):
        prev = feats[i - 1]["id"] if i > 0 else None
        next_ = feats[i + 1]["id"] if i + 1 < len(feats) else None
        page = _feature_page(f, analysis, summary, prev, next_, first_token)
        (root / "features" / f"{f['id']}.html").write_text(page, encoding="utf-8")


def _json(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _top_tokens(f: dict) -> list[str]:
    """The distinct tokens a feature fires hardest on, from its top examples, strongest first."""
    tokens = dict.fromkeys(ex["tokens"][ex["center"]] for ex in f["examples"])
    return list(tokens)[:TOP_TOKENS]


def _index_row(f: dict) -> list:
    """[id, density, max_act, mean_act, top tokens, promoted tokens, snippet tokens, snippet activations
    (percent of max_act), snippet's activating position, histogram counts or null]: one row of `SAE_INDEX`."""
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
    hist = f["histogram"]["counts"] if f.get("histogram") else None
    density = float(f"{f['density']:.4g}")
    return [f["id"], density, f["max_act"], f["mean_act"], _top_tokens(f), up, tokens, acts, center, hist]


def _summary(analysis: dict) -> str:
    """The line atop every page: model, hook, SAE, tokens analysed, dead features."""
    a, esc = analysis, html.escape
    n_dead = sum(f["density"] <= 0 for f in a["features"])
    return (
        f"<strong>{esc(str(a['model']))}</strong> · hook {esc(str(a['hook']))}"
        f" · {esc(str(a.get('arch', 'topk')))} SAE, d_sae {a['d_sae']:,} (d_in {a['d_in']}, k {a['k']})"
        f" · {a['n_tokens']:,} tokens · {n_dead:,} dead ({n_dead / max(len(a['features']), 1):.1%})"
    )


def _head(title: str, css: str) -> str:
    return (
        '<!doctype html>\n<html lang="en" class="sae"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="{css}"></head>\n'
    )


def _index_page(analysis: dict) -> str:
    title = f"SAE features · {analysis['model']} · {analysis['hook']}"
    sorts = [("id", "id"), ("density", "density"), ("max_act", "max act"), ("mean_act", "mean act")]
    buttons = "".join(f'<button data-sort="{key}">{label}</button>' for key, label in sorts)
    return (
        _head(title, "site.css") + f'<body class="index">\n<header>{_summary(analysis)}</header>\n'
        '<div id="controls"><input id="q" type="search" autocomplete="off" autofocus'
        ' placeholder="feature id, or text of its top or promoted tokens  ( / )">'
        '<label><input id="live" type="checkbox"> hide dead</label><span id="count"></span></div>\n'
        f'<div class="row head">{buttons}<span>histogram</span><span>top example</span>'
        "<span>promotes</span></div>\n"
        '<div id="list"><div id="rows"></div></div>\n'
        "<noscript>The list needs JavaScript; each feature's page is features/ID.html.</noscript>\n"
        '<script src="index-data.js"></script><script src="site.js"></script>\n</body></html>\n'
    )


def _feature_page(
    f: dict, analysis: dict, summary: str, prev: int | None, next_: int | None, names: dict[int, list[str]]
) -> str:
    nav = [
        f'<a rel="prev" href="{prev}.html">← #{prev}</a>' if prev is not None else "",
        '<a href="../index.html">all features</a>',
        f'<a rel="next" href="{next_}.html">#{next_} →</a>' if next_ is not None else "",
    ]
    parts = [
        _head(f"Feature {f['id']} · {analysis['model']} · {analysis['hook']}", "../site.css"),
        f'<body class="feature{"" if f["density"] > 0 else " dead"}">',
        f'<header><nav class="pn">{" · ".join(nav)}</nav>{summary}</header>',
        f"<main>{views.feature_body(f, names)}</main>",
        '<script src="../site.js"></script></body></html>\n',
    ]
    return "\n".join(parts)


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


# Shared by index.html and features/*.html: the fragments' rules (`views.CSS`), then the pages' own.
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

_JS = r"""// Shared by index.html and features/*.html (sae/site.py).
// The index draws the feature list from SAE_INDEX (index-data.js): search, sort, hide dead features. Every
// row has the same height, so only the rows in view are in the page and thousands of features stay fast.
// On a feature page, the arrow keys go to the previous and next feature.
"use strict";
(() => {
  const $ = id => document.getElementById(id);
  const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"};
  const text = s => s.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/[&<>"']/g, c => ESC[c]);

  if (!window.SAE_INDEX) {
    document.addEventListener("keydown", e => {
      if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
      const link = document.querySelector({ArrowLeft: 'a[rel="prev"]', ArrowRight: 'a[rel="next"]'}[e.key]);
      if (link) location.href = link.href;
    });
    return;
  }

  const ROW = 28;  // px, as .row's height in site.css
  const F = window.SAE_INDEX.features.map(([id, density, max_act, mean_act, top, up, ex, ea, ec, hist]) => ({
    id, density, max_act, mean_act, up, ex, ea, ec, hist,
    text: top.concat(up).join("\0").toLowerCase(),  // NUL: a query never matches across two tokens
  }));
  const FIRST_DESC = {id: false, density: true, max_act: true, mean_act: true};
  const state = {q: "", sort: "max_act", desc: true, live: false};
  let shown = [], drawn = "";

  function matches(f, q) {
    return !q || String(f.id) === q.replace(/^#/, "") || f.text.includes(q);
  }
  function spark(h) {
    if (!h || !h.length) return "";
    const top = Math.max(...h.map(Math.log1p)) || 1, w = 60 / h.length;
    const bars = h.map((c, i) => {
      const y = 16 * Math.log1p(c) / top;
      return `<rect x="${(i * w).toFixed(1)}" y="${(16 - y).toFixed(1)}" width="${(w - 0.5).toFixed(1)}" ` +
             `height="${y.toFixed(1)}"/>`;
    });
    return `<svg class="spark" viewBox="0 0 60 16" width="60" height="16">${bars.join("")}</svg>`;
  }
  function snippet(f) {
    return f.ex.map((t, i) => `<span${i === f.ec ? ' class="c"' : ""}` +
                              `${f.ea[i] ? ` style="--a:${f.ea[i] / 100}"` : ""}>${text(t)}</span>`).join("");
  }
  function row(f, i) {
    const pct = f.density > 0 ? +(100 * f.density).toPrecision(2) + "%" : "dead";
    return `<a class="row${f.density > 0 ? "" : " dead"}" href="features/${f.id}.html" ` +
           `style="top:${i * ROW}px"><span>#${f.id}</span><span>${pct}</span>` +
           `<span>${f.max_act.toFixed(2)}</span><span>${f.mean_act.toFixed(2)}</span>` +
           `<span>${spark(f.hist)}</span><span class="t">${snippet(f)}</span>` +
           `<span class="up">${f.up.map(t => `<span class="pill">${text(t)}</span>`).join(" ")}</span></a>`;
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
    const q = state.q.trim().toLowerCase(), key = state.sort, sign = state.desc ? -1 : 1;
    shown = F.filter(f => (!state.live || f.density > 0) && matches(f, q))
             .sort((a, b) => sign * (a[key] - b[key]) || a.id - b.id);
    $("count").textContent = `${shown.length.toLocaleString()} of ${F.length.toLocaleString()} features`;
    $("rows").style.height = `${shown.length * ROW}px`;
    document.querySelectorAll("[data-sort]").forEach(b => {
      b.classList.toggle("on", b.dataset.sort === key);
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
    if (e.key === "Enter" && shown.length) location.href = `features/${shown[0].id}.html`;
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
})();
"""


if __name__ == "__main__":
    main()
