"""HTML fragments of a feature for the notebook views (`sae.dashboard`, `sae.explore`), and the styles they
share with the dashboard site (`sae.site`).

Fragments carry classes, styled by `CSS` inside an element of class `sae`: every page of the site is one (its
site.css holds `CSS`), and a notebook output is one that starts with `CSS` in a `<style>` block (`notebook`).
Every piece of token or analysis text in them is escaped; optional analysis fields (`histogram`, `intervals`,
`nearest`) are shown where present and in the shapes `sae.analyze` writes, and left out otherwise.

A feature's body (`feature_body`) shades every token inline (`shade`), as `sae.explore` shades a text, and
draws its histogram as a compact strip of bars. The site draws a feature's page in the browser, in the same
classes (site.js in `sae.site`), since a static page per feature does not scale to 65,536 features.
"""

import functools
import html
import math
from typing import Any

HIGHLIGHT = "255,140,0"  # token highlight colour; alpha carries the activation
_BAR = "#e08a1e"  # histogram bars
_CENTER = ";outline:1.5px solid #c00;font-weight:bold"  # the activating token of an example, shaded inline

CSS = f"""\
.sae .muted,.sae small{{color:#888}}
.sae h1{{font-size:1.4em;margin:.6em 0 .1em}}
.sae h2{{font-size:1.05em;margin:1.4em 0 .4em;border-bottom:1px solid #eee}}
.sae h3{{font-size:.95em;margin:1em 0 .3em}}
.sae .pill{{font-family:ui-monospace,Menlo,monospace;white-space:pre;padding:0 3px;border-radius:3px;background:#eee}}
.sae .up .pill{{background:#d9f2d9}}
.sae .down .pill{{background:#f6d5d5}}
/* Tokens: --a is the activation as a fraction of the feature's max; .c is the activating token. */
.sae .t{{font-family:ui-monospace,Menlo,monospace;white-space:pre}}
.sae .t span{{background:rgba({HIGHLIGHT},var(--a,0));border-radius:2px}}
.sae .t span.c{{outline:1.5px solid #c00;font-weight:bold}}
.sae .t.wrap{{white-space:pre-wrap;line-height:1.9}}
.sae table{{border-collapse:collapse;margin:0}}
.sae .ex td{{padding:1px 10px 1px 0;vertical-align:top;line-height:1.8;text-align:left}}
.sae .ex .v{{text-align:right;color:#888;font-variant-numeric:tabular-nums}}
.sae .ex .p{{color:#aaa;font-size:12px;white-space:nowrap}}
.sae table.grid{{font-size:13px}}
.sae .grid th,.sae .grid td{{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}}
.sae .hist rect{{fill:{_BAR}}}
.sae .strip{{display:flex;align-items:flex-end;gap:1px;height:42px}}
.sae .strip div{{width:6px}}
.sae ol.near{{display:flex;flex-wrap:wrap;gap:4px 28px;list-style:none;padding:0}}
.sae .sae-card{{margin:0 0 1.2em}}
"""


def alpha(act: float, max_act: float) -> float:
    """`act` as a fraction of `max_act`, clipped to [0, 1]: the opacity of a token's highlight."""
    return min(max(act / max_act, 0.0), 1.0) if max_act > 0 else 0.0


@functools.lru_cache(maxsize=1 << 18)  # tokens repeat across examples and features; the vocabulary bounds it
def token_text(token: str) -> str:
    """A token as HTML text: escaped, with newlines and tabs shown as ↵ and ⇥."""
    # Newlines and tabs would break the one-line layout of an example; spaces stay (white-space: pre).
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥"))


def density_text(d: float) -> str:
    """`density 1.2% (log10 -1.92)`, or `dead (never fired)`."""
    return f"density {100 * d:.3g}% (log10 {math.log10(d):.2f})" if d > 0 else "dead (never fired)"


def shade(token: str, act: float, scale: float, title: str, extra: str = "") -> str:
    """`token` as a span shaded inline by `act` relative to `scale`, `title` on hover, `extra` added to its style."""
    style = f"background:rgba({HIGHLIGHT},{alpha(act, scale):.2f}){extra}"
    return f'<span title="{html.escape(title)}" style="{style}">{token_text(token)}</span>'


def shades(ex: dict, max_act: float) -> str:
    """An example's tokens for a notebook: every token shaded inline, the activating one outlined."""
    pairs = enumerate(zip(ex["tokens"], ex["acts"], strict=True))
    return "".join(
        shade(t, a, max_act, f"act={a:.2f}", _CENTER if i == ex["center"] else "") for i, (t, a) in pairs
    )


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _is_example(x: Any) -> bool:
    if not (isinstance(x, dict) and all(_number(x.get(k)) for k in ("act", "row", "pos", "center"))):
        return False
    tokens, acts = x.get("tokens"), x.get("acts")
    return isinstance(tokens, list) and isinstance(acts, list) and len(tokens) == len(acts)


def examples(exs: list[dict], max_act: float) -> str:
    """Examples as a table, one a row: activation, tokens, where it stands (row and position in the corpus)."""
    if not exs:
        return '<p class="muted">no examples</p>'
    rows = "".join(
        f'<tr><td class="v">{ex["act"]:.2f}</td><td class="t">{shades(ex, max_act)}</td>'
        f'<td class="p">row {ex["row"]} · pos {ex["pos"]}</td></tr>'
        for ex in exs
    )
    return f'<table class="ex">{rows}</table>'


def stats(f: dict) -> str:
    """A feature's heading and its density, max and mean activation."""
    line = f"{density_text(f['density'])} · max act {f['max_act']:.2f} · mean act {f['mean_act']:.2f}"
    return f'<h1>Feature {f["id"]}</h1><p class="stats">{line}</p>'


def _strip(heights: list[float], titles: list[str]) -> str:
    bars = "".join(
        f'<div title="{title}" style="height:{max(1, round(40 * h))}px;background:{_BAR}"></div>'
        for h, title in zip(heights, titles, strict=True)
    )
    return f'<div class="strip">{bars}</div>'


def histogram(hist: Any) -> str:
    """The activation histogram {"counts": [n], "edges": [n + 1]} as a strip of bars; heights on a log scale,
    since counts fall by orders of magnitude from the weakest bin to the strongest."""
    counts, edges = (hist.get("counts"), hist.get("edges")) if isinstance(hist, dict) else (None, None)
    if not (isinstance(counts, list) and counts and all(map(_number, counts))):
        return ""
    if not (isinstance(edges, list) and len(edges) == len(counts) + 1 and all(map(_number, edges))):
        return ""
    top = max(math.log1p(c) for c in counts) or 1.0
    heights = [math.log1p(c) / top for c in counts]
    titles = [f"{lo:.3g} – {hi:.3g}: {c:,} tokens" for c, lo, hi in zip(counts, edges, edges[1:])]
    head = f"Activation histogram {edges[0]:.2f} … {edges[-1]:.2f} <small>(log scale)</small>"
    return f'<h2>{head}</h2>{_strip(heights, titles)}<p class="muted">{sum(counts):,} activations</p>'


def _pills(label: str, pairs: list, cls: str) -> str:
    pills = " ".join(f'<span class="pill">{token_text(t)} <small>{v:+.2f}</small></span>' for t, v in pairs)
    return f'<p class="{cls}"><span class="muted">{label}</span> {pills}</p>'


def logits(f: dict) -> str:
    """The tokens a feature's decoder direction promotes and suppresses (logit lens); '' without them."""
    rows = [("promotes", "top_logits", "up"), ("suppresses", "bottom_logits", "down")]
    parts = [_pills(label, f[key], cls) for label, key, cls in rows if f.get(key)]
    return "<h2>Logit lens</h2>" + "".join(parts) if parts else ""


def bands(intervals: Any, max_act: float) -> str:
    """Samples by activation band, [{"lo", "hi", "count", "examples"}, ...], strongest first; bands with
    neither tokens nor examples left out."""
    valid = [
        b for b in _list(intervals) if isinstance(b, dict) and _number(b.get("lo")) and _number(b.get("hi"))
    ]
    parts = []
    for band in sorted(valid, key=lambda b: -b["lo"]):
        exs = band.get("examples")
        exs = [ex for ex in exs if _is_example(ex)] if isinstance(exs, list) else []
        count = band.get("count") if _number(band.get("count")) else 0
        if not count and not exs:
            continue
        head = f"act {band['lo']:.2f} – {band['hi']:.2f}" + (f" · {count:,} tokens" if count else "")
        parts.append(f"<h3>{head}</h3>{examples(exs, max_act)}")
    return "<h2>Samples by activation band</h2>" + "".join(parts) if parts else ""


def nearest(pairs: Any) -> str:
    """Nearest features by decoder cosine, [[id, cos], ...]."""
    valid = [p for p in _list(pairs) if isinstance(p, list | tuple) and len(p) == 2 and all(map(_number, p))]
    items = "".join(f"<li>#{int(i)} <small>{c:.2f}</small></li>" for i, c in valid)
    if not items:
        return ""
    return f'<h2>Nearest features <small>(decoder cosine)</small></h2><ol class="near">{items}</ol>'


def feature_body(f: dict) -> str:
    """A feature's statistics, activation histogram, logit lens, top examples, samples by activation band and
    nearest features."""
    max_act = float(f["max_act"])
    parts = [
        stats(f),
        histogram(f.get("histogram")),
        logits(f),
        f"<h2>Top activations</h2>{examples(f['examples'], max_act)}",
        bands(f.get("intervals"), max_act),
        nearest(f.get("nearest")),
    ]
    return "\n".join(p for p in parts if p)


def card(f: dict) -> str:
    """A feature drawn for a notebook, in a box of its own (`sae-card`)."""
    return f'<div class="sae-card">{feature_body(f)}</div>'


def notebook(fragment: str) -> str:
    """`fragment` as one notebook output: `CSS` in a `<style>` block, then the fragment, in a `sae` element."""
    return f'<div class="sae"><style>{CSS}</style>{fragment}</div>'
