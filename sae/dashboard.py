"""Rendering analysis results: one static HTML page, and HTML fragments for notebooks.

    python -c "import sae.dashboard as d; d.render_dashboard(d.load_analysis('runs/demo'), 'dash.html')"

The page is a single file with no network access: the analysis JSON is embedded in a
`<script type="application/json">` block and the feature list and details are rendered client-side, so a
dictionary of tens of thousands of features opens as fast as the browser can parse the JSON. `feature_html`
builds the same detail view in Python for notebooks; both take their inline styles from `_STYLE`, and inline
styles (rather than a stylesheet) keep a fragment readable wherever a notebook's HTML output is shown.
"""

import html
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

from sae.files import write_text

_STYLE = {
    "rgb": "255,140,0",  # token highlight colour; alpha carries the activation
    "line": "font-family:ui-monospace,Menlo,monospace;white-space:pre;line-height:1.9;overflow-x:auto",
    "center": "outline:1.5px solid #c00;font-weight:bold",
    "muted": "color:#888",
    "up": "background:#d9f2d9;white-space:pre;font-family:ui-monospace,monospace;padding:0 3px",
    "down": "background:#f6d5d5;white-space:pre;font-family:ui-monospace,monospace;padding:0 3px",
}


def load_analysis(run_dir: str | Path) -> dict:
    """Read `run_dir/analysis/features.json`, the result of `analyze.py`."""
    path = Path(run_dir) / "analysis" / "features.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no analysis at {path}: run `python analyze.py run_dir={run_dir}` first to write it"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def top_features(analysis: dict, n: int) -> list[dict]:
    """The `n` live features (density > 0) with the highest max activation, strongest first."""
    live = [f for f in analysis["features"] if f["density"] > 0]
    return sorted(live, key=lambda f: -f["max_act"])[:n]


def _text(token: str) -> str:
    # Newlines and tabs would break the one-line layout of an example; spaces stay (white-space: pre).
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥"))


def _density(d: float) -> str:
    return f"density {100 * d:.3g}% (log10 {math.log10(d):.2f})" if d > 0 else "dead (never fired)"


def _token(token: str, act: float, max_act: float, center: bool) -> str:
    alpha = min(max(act / max_act, 0.0), 1.0) if max_act > 0 else 0.0
    style = f"background:rgba({_STYLE['rgb']},{alpha:.2f})" + (";" + _STYLE["center"] if center else "")
    return f'<span title="act={act:.2f}" style="{style}">{_text(token)}</span>'


def _example(ex: dict, max_act: float) -> str:
    pairs = enumerate(zip(ex["tokens"], ex["acts"], strict=True))
    spans = "".join(_token(t, a, max_act, i == ex["center"]) for i, (t, a) in pairs)
    act = f'<span style="{_STYLE["muted"]}">{ex["act"]:6.2f}  </span>'
    return f'<div style="{_STYLE["line"]}" title="row {ex["row"]}, pos {ex["pos"]}">{act}{spans}</div>'


def _logits(label: str, pairs: list, style: str) -> str:
    pill = '<span style="{}">{} <small>{:+.2f}</small></span>'
    pills = " ".join(pill.format(_STYLE[style], _text(t), v) for t, v in pairs)
    return f'<div><span style="{_STYLE["muted"]}">{label}</span> {pills}</div>'


def feature_html(feature: dict) -> str:
    """One feature as an HTML fragment: stats, promoted/suppressed tokens, and its top examples."""
    f = feature
    head = f"<strong>Feature {f['id']}</strong> · {_density(f['density'])}"
    head += f" · max act {f['max_act']:.2f} · mean act {f['mean_act']:.2f}"
    parts = [f'<div style="font-size:1.1em;margin-bottom:4px">{head}</div>']
    if f.get("top_logits"):
        parts.append(_logits("promotes", f["top_logits"], "up"))
    if f.get("bottom_logits"):
        parts.append(_logits("suppresses", f["bottom_logits"], "down"))
    parts += [_example(ex, f["max_act"]) for ex in f["examples"]]
    if not f["examples"]:
        parts.append(f'<div style="{_STYLE["muted"]}">no examples</div>')
    return f'<div class="sae-feature" style="margin:0 0 1.2em">{"".join(parts)}</div>'


def _script_json(obj: object) -> str:
    # JSON allows \u escapes anywhere in strings and `<>&` occur only inside strings, so escaping them keeps
    # the JSON identical while no token (`</script>`, `<!--`) can end or confuse the script block.
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_dashboard(analysis: dict, path: str | Path) -> Path:
    """Write the whole analysis as one self-contained HTML page at `path` (atomically); return the path."""
    path = Path(path)
    feats = analysis["features"]
    n_dead = sum(f["density"] <= 0 for f in feats)
    header = (
        f"<strong>{html.escape(str(analysis['model']))}</strong> · hook {html.escape(str(analysis['hook']))}"
        f" · {html.escape(str(analysis.get('arch', 'topk')))} SAE, d_sae {analysis['d_sae']}"
        f" (d_in {analysis['d_in']}, k {analysis['k']})"
        f" · {analysis['n_tokens']:,} tokens · {n_dead} dead ({n_dead / max(len(feats), 1):.1%})"
    )
    values = {
        "TITLE": html.escape(f"SAE features · {analysis['model']} · {analysis['hook']}"),
        "HEADER": header,
        "STYLE": _script_json(_STYLE),
        "DATA": _script_json(analysis),
    }
    # One pass over the template, so text substituted in (tokens included) is never itself substituted.
    page = re.sub(r"__([A-Z]+)__", lambda m: values[m.group(1)], _TEMPLATE)
    return write_text(path, page)


def show(run_dir: str | Path, feature_ids: Iterable[int] | None = None, n: int = 5) -> None:
    """In a notebook, display the given features, or the `n` live features with the highest max activation."""
    from IPython.display import HTML, display  # notebook-only dependency

    analysis = load_analysis(run_dir)
    if feature_ids is None:
        feats = top_features(analysis, n)
    else:
        feature_ids = list(feature_ids)
        by_id = {f["id"]: f for f in analysis["features"]}
        missing = [i for i in feature_ids if i not in by_id]
        if missing:
            raise ValueError(f"feature ids {missing} not in the analysis: ids run 0..{len(by_id) - 1}")
        feats = [by_id[i] for i in feature_ids]
    display(HTML("".join(feature_html(f) for f in feats)))


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#222;display:flex;flex-direction:column;height:100vh}
header{padding:8px 14px;background:#2b2b2b;color:#ddd}
header strong{color:#fff}
main{flex:1;display:flex;min-height:0}
#side{width:310px;border-right:1px solid #ddd;display:flex;flex-direction:column}
#controls{padding:8px;display:flex;gap:6px;border-bottom:1px solid #eee}
#q{flex:1;min-width:0;padding:3px 6px}
#count{padding:3px 10px;color:#888;font-size:12px;border-bottom:1px solid #eee}
#list{flex:1;overflow-y:auto}
.row{display:grid;grid-template-columns:4.5em 1fr 4em;padding:2px 10px;cursor:pointer;
     font-variant-numeric:tabular-nums}
.row span:last-child{text-align:right}
.row:hover{background:#f4f4f4}
.row.sel{background:#ffe0bd}
.row.dead{color:#bbb}
#detail{flex:1;overflow:auto;padding:14px 20px}
#detail.dead{color:#999}
</style></head>
<body>
<header>__HEADER__</header>
<main>
<div id="side">
  <div id="controls">
    <input id="q" placeholder="feature id or token text" autocomplete="off">
    <select id="sort"><option value="max_act">max act</option><option value="density">density</option>
      <option value="id">id</option></select>
  </div>
  <div id="count"></div>
  <div id="list"></div>
</div>
<div id="detail"></div>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
const S = __STYLE__;
const A = JSON.parse(document.getElementById("data").textContent);
const F = A.features, byId = new Map(F.map(f => [f.id, f]));
const $ = id => document.getElementById(id);
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"};
const esc = s => String(s).replace(/[&<>"']/g, c => ESC[c]);
const text = s => esc(s.replace(/\n/g, "↵").replace(/\t/g, "⇥"));
const fix = (x, n) => x.toFixed(n);
const sign = x => (x >= 0 ? "+" : "") + x.toFixed(2);
const density = d => d > 0 ? `density ${+(100 * d).toPrecision(3)}% (log10 ${Math.log10(d).toFixed(2)})`
                           : "dead (never fired)";
let shown = [], current = null;

// Mirrors feature_html in sae/dashboard.py.
function token(t, a, max, center) {
  const alpha = max > 0 ? Math.min(Math.max(a / max, 0), 1) : 0;
  const style = `background:rgba(${S.rgb},${alpha.toFixed(2)})` + (center ? ";" + S.center : "");
  return `<span title="act=${fix(a, 2)}" style="${style}">${text(t)}</span>`;
}
function example(ex, max) {
  const spans = ex.tokens.map((t, i) => token(t, ex.acts[i], max, i === ex.center)).join("");
  return `<div style="${S.line}" title="row ${ex.row}, pos ${ex.pos}"><span style="${S.muted}">` +
         `${fix(ex.act, 2).padStart(6)}  </span>${spans}</div>`;
}
function logits(label, pairs, style) {
  const pill = ([t, v]) => `<span style="${S[style]}">${text(t)} <small>${sign(v)}</small></span>`;
  return `<div><span style="${S.muted}">${label}</span> ${pairs.map(pill).join(" ")}</div>`;
}
function featureHtml(f) {
  const parts = [`<div style="font-size:1.1em;margin-bottom:4px">` +
    `<strong>Feature ${f.id}</strong> · ${density(f.density)} · max act ${fix(f.max_act, 2)}` +
    ` · mean act ${fix(f.mean_act, 2)}</div>`];
  if (f.top_logits && f.top_logits.length) parts.push(logits("promotes", f.top_logits, "up"));
  if (f.bottom_logits && f.bottom_logits.length) parts.push(logits("suppresses", f.bottom_logits, "down"));
  parts.push(...f.examples.map(ex => example(ex, f.max_act)));
  if (!f.examples.length) parts.push(`<div style="${S.muted}">no examples</div>`);
  return `<div class="sae-feature" style="margin:0 0 1.2em">${parts.join("")}</div>`;
}

function matches(f, q) {
  if (!q || String(f.id) === q) return true;
  // NUL between tokens so a query never matches across a token boundary.
  if (f._text === undefined) f._text = f.examples.map(e => e.tokens.join("\0")).join("\0").toLowerCase();
  return f._text.includes(q.toLowerCase());
}
const KEYS = {id: f => f.id, density: f => -f.density, max_act: f => -f.max_act};
function refresh() {
  const q = $("q").value.trim(), key = KEYS[$("sort").value];
  shown = F.filter(f => matches(f, q)).sort((a, b) => key(a) - key(b) || a.id - b.id);
  $("count").textContent = `${shown.length} of ${F.length} features`;
  $("list").innerHTML = shown.map(f =>
    `<div class="row${f.density > 0 ? "" : " dead"}${f === current ? " sel" : ""}" data-id="${f.id}">` +
    `<span>#${f.id}</span><span>${f.density > 0 ? +(100 * f.density).toPrecision(2) + "%" : "dead"}</span>` +
    `<span>${fix(f.max_act, 2)}</span></div>`).join("");
}
function select(f) {
  if (!f) return;
  current = f;
  $("detail").innerHTML = featureHtml(f);
  $("detail").className = f.density > 0 ? "" : "dead";
  document.querySelectorAll(".row.sel").forEach(r => r.classList.remove("sel"));
  const row = document.querySelector(`.row[data-id="${f.id}"]`);
  if (row) { row.classList.add("sel"); row.scrollIntoView({block: "nearest"}); }
  history.replaceState(null, "", "#" + f.id);
}

$("q").addEventListener("input", refresh);
$("sort").addEventListener("change", () => { refresh(); select(current); });
$("list").addEventListener("click", e => {
  const row = e.target.closest(".row");
  if (row) select(byId.get(+row.dataset.id));
});
document.addEventListener("keydown", e => {
  if (e.key !== "ArrowDown" && e.key !== "ArrowUp" || e.target.tagName === "SELECT") return;
  e.preventDefault();
  const i = shown.indexOf(current) + (e.key === "ArrowDown" ? 1 : -1);
  select(shown[Math.min(Math.max(i, 0), shown.length - 1)]);
});

refresh();
const live = F.filter(f => f.density > 0);
const best = live.reduce((a, b) => (b.max_act > a.max_act ? b : a), live[0] || F[0]);
select(byId.get(parseInt(location.hash.slice(1))) || best);
</script>
</body></html>
"""
