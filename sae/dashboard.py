"""Analysis results in a notebook: loading `features.json` and HTML fragments of features.

    sae.dashboard.show("runs/demo", n=5)          # the five strongest live features, inline
    sae.dashboard.show("runs/demo", [12, 40])     # features by id

The browsable site of every feature is `sae.site`. Fragments here carry inline styles (from `_STYLE`) rather
than a stylesheet, so they read the same wherever a notebook's HTML output is shown.
"""

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path

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


def token_text(token: str) -> str:
    """A token as HTML text: escaped, with newlines and tabs shown as ↵ and ⇥."""
    # Newlines and tabs would break the one-line layout of an example; spaces stay (white-space: pre).
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥"))


def density_text(d: float) -> str:
    """`density 1.2% (log10 -1.92)`, or `dead (never fired)`."""
    return f"density {100 * d:.3g}% (log10 {math.log10(d):.2f})" if d > 0 else "dead (never fired)"


def _token(token: str, act: float, max_act: float, center: bool) -> str:
    alpha = min(max(act / max_act, 0.0), 1.0) if max_act > 0 else 0.0
    style = f"background:rgba({_STYLE['rgb']},{alpha:.2f})" + (";" + _STYLE["center"] if center else "")
    return f'<span title="act={act:.2f}" style="{style}">{token_text(token)}</span>'


def _example(ex: dict, max_act: float) -> str:
    pairs = enumerate(zip(ex["tokens"], ex["acts"], strict=True))
    spans = "".join(_token(t, a, max_act, i == ex["center"]) for i, (t, a) in pairs)
    act = f'<span style="{_STYLE["muted"]}">{ex["act"]:6.2f}  </span>'
    return f'<div style="{_STYLE["line"]}" title="row {ex["row"]}, pos {ex["pos"]}">{act}{spans}</div>'


def _logits(label: str, pairs: list, style: str) -> str:
    pill = '<span style="{}">{} <small>{:+.2f}</small></span>'
    pills = " ".join(pill.format(_STYLE[style], token_text(t), v) for t, v in pairs)
    return f'<div><span style="{_STYLE["muted"]}">{label}</span> {pills}</div>'


def feature_html(feature: dict) -> str:
    """One feature as an HTML fragment: stats, promoted/suppressed tokens, and its top examples."""
    f = feature
    head = f"<strong>Feature {f['id']}</strong> · {density_text(f['density'])}"
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
