"""A finished run directory in a notebook: which features fire on this text, and HTML views of them.

    from sae.explore import Explorer, text_html
    ex = Explorer.load("runs/demo")             # the SAE, the model it reads and the analysis
    found = ex.features_on_text("The Eiffel Tower is in Paris.")
    found.ranked[0]                             # the feature with the most activation on the text
    text_html(found, found.ranked[0]["id"])     # the text, each token shaded by that feature (hover: value)

The text goes through the model as the pipeline's contexts do (`sae.data.packed_contexts`): BOS first, then
the text's tokens, at most `data.context_size` positions per forward. Special tokens are never encoded, and
tokens whose activation norm exceeds `model.max_norm_ratio` times the text's median (massive activations,
see `harvest.keep_rows`) are left out, as in training and analysis; they show as skipped.

The renderers return HTML strings (wrap them in `IPython.display.HTML`); every piece of token or analysis
text in them is escaped. A feature card is `dashboard.feature_html` plus the analysis keys it does not show
(`intervals`, `histogram`, `nearest`), each only where present.
"""

import html
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae import dashboard, harvest
from sae.config import TrainJob
from sae.data import bos_eos, special_ids
from sae.model import SAE, Code
from sae.rundir import open_run

RGB = "255,140,0"  # the dashboard's highlight colour; alpha carries the activation
_MONO = "font-family:ui-monospace,Menlo,monospace"
_MUTED = "color:#888"
_TABLE = "border-collapse:collapse;font-size:13px"
_CELL = "padding:2px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top"


# --- loading --------------------------------------------------------------------------------------------


def load_metrics(run_dir: str | Path) -> dict | None:
    """The held-out metrics of a run (`metrics.json`), or None where the run has none."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_analysis(run_dir: str | Path) -> dict | None:
    """`analysis/features.json` of a run, or None where the run was not analysed."""
    path = Path(run_dir) / "analysis" / "features.json"
    return dashboard.load_analysis(run_dir) if path.is_file() else None


@dataclass
class TextFeatures:
    """The features an SAE finds on one text, token by token."""

    text: str
    """The text as given."""
    ids: list[int]
    """[T] its token ids (no BOS)."""
    tokens: list[str]
    """[T] each token decoded alone."""
    kept: list[bool]
    """[T] False where the token was not encoded: a special token or a massive activation."""
    code: Code
    """Code([T, K], [T, K]): the active latents of each token, zero acts where none (skipped tokens)."""
    d_sae: int
    """Number of latents F."""
    ranked: list[dict]
    """The strongest features on the text: id, total, max, tokens (how many it fired on), density, max_act
    (both from the analysis, None without one), promotes (top logit-lens tokens), example (a snippet of its
    top example, the activating token in «»)."""

    def acts(self, feature: int) -> list[float]:
        """[T] activation of `feature` on each token (0 where it did not fire)."""
        hit = self.code.idx == feature  # [T, K]
        return (self.code.acts * hit).sum(dim=1).tolist()

    def per_token(self, top: int | None = None) -> list[dict]:
        """One row per token: pos, token, kept, and its active features as (id, act), strongest first (at most
        `top` of them)."""
        rows = []
        for t, (token, kept) in enumerate(zip(self.tokens, self.kept)):
            acts, idx = self.code.acts[t], self.code.idx[t]
            order = acts.argsort(descending=True)
            feats = [(int(idx[j]), float(acts[j])) for j in order if acts[j] > 0][:top]
            rows.append({"pos": t, "token": token, "kept": kept, "features": feats})
        return rows


class Explorer:
    """A run directory loaded for interactive use: its SAE, the model and module it reads, its analysis."""

    def __init__(self, run_dir: Path, job: TrainJob, sae: SAE, model, tokenizer, module: str,
                 analysis: dict | None, metrics: dict | None):  # fmt: skip
        self.run_dir, self.job, self.sae = run_dir, job, sae
        self.model, self.tokenizer, self.module = model, tokenizer, module
        self.analysis, self.metrics = analysis, metrics

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None) -> "Explorer":
        """Loads a finished run directory (`sae.safetensors`, `cfg.json`, `run.json`; the analysis and
        metrics where present). `device` overrides the run's `model.device` for the model and the SAE."""
        run = open_run(run_dir, device)
        assert run.job is not None and run.module is not None
        return cls(
            run.dir,
            run.job,
            run.sae,
            run.model,
            run.tokenizer,
            run.module,
            load_analysis(run.dir),
            load_metrics(run.dir),
        )

    def feature(self, i: int) -> dict:
        """Feature `i` of the analysis (density, examples, logit lens, ...)."""
        if self.analysis is None:
            raise FileNotFoundError(
                f"{self.run_dir} has no analysis: run `python analyze.py run_dir={self.run_dir}` first"
            )
        return feature_by_id(self.analysis, i)

    @torch.no_grad()
    def encode_text(self, text: str) -> tuple[list[int], torch.Tensor, Code]:
        """(ids [T], kept [T], code [T, K]) of `text`: the SAE's code of each of its tokens, with BOS before
        every `data.context_size - 1` tokens as in the pipeline's packing; zero code where not kept."""
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            raise ValueError(f"text {text!r:.60} has no tokens")
        bos, _ = bos_eos(self.tokenizer)
        step = self.job.data.context_size - 1
        xs = []
        for i in range(0, len(ids), step):
            context = torch.tensor([[bos] + ids[i : i + step]])  # [1, t + 1]
            acts = harvest.capture(self.model, [self.module], context)[self.module]  # [1, t + 1, D]
            xs.append(acts[0, 1:].float())  # [t, D]
        x = torch.cat(xs)  # [T, D]
        kept = ~torch.isin(torch.tensor(ids), torch.tensor(special_ids(self.tokenizer))).to(x.device)  # [T]
        kept[kept.clone()] = harvest.keep_rows(x[kept], self.job.model.max_norm_ratio)
        device = next(self.sae.parameters()).device
        code = self.sae.encode(x[kept].to(device))  # [B, K]
        acts = torch.zeros(len(ids), code.acts.shape[1])  # [T, K]
        idx = torch.zeros(len(ids), code.acts.shape[1], dtype=torch.long)
        acts[kept.cpu()], idx[kept.cpu()] = code.acts.float().cpu(), code.idx.cpu()
        return ids, kept.cpu(), Code(acts, idx)

    def features_on_text(self, text: str, top: int = 10, by: str = "total") -> TextFeatures:
        """Which features fire on `text`: each token's active features, and the `top` features ranked `by`
        their total or max activation on it, with what the analysis says about them."""
        if by not in ("total", "max"):
            raise ValueError(f"by={by!r}; accepted: 'total' or 'max'")
        ids, kept, code = self.encode_text(text)
        z = self.sae.dense(code)  # [T, F]
        total, peak, fired = z.sum(dim=0), z.max(dim=0).values, (z > 0).sum(dim=0)  # [F]
        score = total if by == "total" else peak
        n = min(top, int((fired > 0).sum()))
        ranked = []
        for f in score.topk(n).indices.tolist() if n else []:
            info = feature_by_id(self.analysis, f) if self.analysis is not None else {}
            ranked.append({
                "id": f, "total": round(total[f].item(), 4), "max": round(peak[f].item(), 4),
                "tokens": int(fired[f]), "density": info.get("density"), "max_act": info.get("max_act"),
                "promotes": [t for t, _ in info.get("top_logits", [])[:5]], "example": snippet(info),
            })  # fmt: skip
        tokens = [self.tokenizer.decode([i]) for i in ids]
        return TextFeatures(text, ids, tokens, kept.tolist(), code, self.sae.d_sae, ranked)


def feature_by_id(analysis: dict, i: int) -> dict:
    """Feature `i` of `analysis` (density, examples, logit lens, ...)."""
    feats = analysis["features"]
    if not (0 <= i < len(feats) and feats[i]["id"] == i):
        by_id = {f["id"]: f for f in feats}
        if i not in by_id:
            raise ValueError(f"feature {i} is not in the analysis: ids run 0..{len(feats) - 1}")
        return by_id[i]
    return feats[i]


def snippet(feature: dict, before: int = 6, after: int = 2) -> str:
    """A short plain-text view of a feature's top example, the activating token in «»; '' without one."""
    examples = feature.get("examples") or []
    if not examples:
        return ""
    ex = examples[0]
    c = ex["center"]
    toks = [t.replace("\n", "↵") for t in ex["tokens"]]
    return "".join(toks[max(0, c - before) : c]) + f"«{toks[c]}»" + "".join(toks[c + 1 : c + 1 + after])


def feature_rows(analysis: dict) -> list[dict]:
    """One flat row per feature (id, density, max_act, mean_act, promotes, example), e.g. for a DataFrame."""
    return [
        {"id": f["id"], "density": f["density"], "max_act": f["max_act"], "mean_act": f["mean_act"],
         "promotes": " ".join(repr(t) for t, _ in f.get("top_logits", [])[:5]), "example": snippet(f)}
        for f in analysis["features"]
    ]  # fmt: skip


# --- HTML -----------------------------------------------------------------------------------------------


def _esc(s: object) -> str:
    return dashboard.token_text(str(s))


def _alpha(act: float, scale: float) -> float:
    return min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0


def _span(token: str, act: float, scale: float, title: str, extra: str = "") -> str:
    style = f"background:rgba({RGB},{_alpha(act, scale):.2f})" + extra
    return f'<span title="{html.escape(title)}" style="{style}">{_esc(token)}</span>'


def _density(d: float | None) -> str:
    return "-" if d is None else ("dead" if d <= 0 else f"{100 * d:.3g}%")


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    head = "".join(f'<th style="{_CELL}">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{_CELL}">{c}</td>' for c in r) + "</tr>" for r in rows)
    return f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def text_html(found: TextFeatures, feature: int, scale: float | None = None) -> str:
    """The text with each token shaded by `feature`'s activation on it (hover shows the value). Shading is
    relative to `scale`, by default the feature's max activation in the analysis (else its max here)."""
    if not 0 <= feature < found.d_sae:
        raise ValueError(f"feature {feature} is out of range: the SAE has latents 0..{found.d_sae - 1}")
    acts = found.acts(feature)
    if scale is None:
        known = next((r["max_act"] for r in found.ranked if r["id"] == feature), None)
        scale = known if known else max(acts)
    spans = []
    for token, act, kept in zip(found.tokens, acts, found.kept):
        if kept:
            spans.append(_span(token, act, scale, f"{token!r}  feature {feature}: {act:.3f}"))
        else:
            title = f"{token!r}  skipped: special token or massive activation, not encoded"
            spans.append(_span(token, 0.0, 1.0, title, ";color:#aaa;text-decoration:line-through"))
    head = (f'<div style="{_MUTED}">feature {feature}: max {max(acts):.2f} on this text, shading relative to '
            f"{scale:.2f}</div>")  # fmt: skip
    body = f'<div style="{_MONO};white-space:pre-wrap;line-height:1.9">{"".join(spans)}</div>'
    return f'<div class="sae-text">{head}{body}</div>'


def tokens_html(found: TextFeatures, top: int = 5) -> str:
    """The per-token table: each token and its `top` strongest features, shaded by their activation."""
    scale = float(found.code.acts.max()) if found.code.acts.numel() else 0.0
    rows = []
    for r in found.per_token(top):
        pills = " ".join(_span(f"#{f} {a:.2f}", a, scale, f"feature {f}: {a:.3f}") for f, a in r["features"])
        state = "" if r["kept"] else f'<span style="{_MUTED}">skipped</span>'
        rows.append([str(r["pos"]), f'<span style="{_MONO};white-space:pre;background:#f0f0f0">{_esc(r["token"])}</span>',
                     f'<span style="{_MONO}">{pills}</span>{state}'])  # fmt: skip
    return _table(["pos", "token", f"top {top} features (id act)"], rows)


def ranked_html(found: TextFeatures) -> str:
    """The features ranked on the text: activation here, density and what the analysis says of them."""
    rows = [
        [str(i + 1), f"<strong>{r['id']}</strong>", f"{r['total']:.2f}", f"{r['max']:.2f}", str(r["tokens"]),
         _density(r["density"]), f'<span style="{_MONO};white-space:pre">{_esc(" ".join(map(repr, r["promotes"])))}</span>',
         f'<span style="{_MONO};white-space:pre">{_esc(r["example"])}</span>']
        for i, r in enumerate(found.ranked)
    ]  # fmt: skip
    header = ["rank", "feature", "total", "max", "tokens", "density", "promotes", "top example"]
    return _table(header, rows)


def index_html(analysis: dict, n: int = 20, sort: str = "max_act") -> str:
    """A table of `n` features sorted by `sort` (max_act, density, mean_act: largest first; id)."""
    if sort not in ("max_act", "density", "mean_act", "id"):
        raise ValueError(f"sort={sort!r}; accepted: 'max_act', 'density', 'mean_act' or 'id'")
    rows = sorted(feature_rows(analysis), key=lambda r: r["id"] if sort == "id" else -r[sort])[:n]
    cells = [
        [f"<strong>{r['id']}</strong>", _density(r["density"]), f"{r['max_act']:.2f}", f"{r['mean_act']:.2f}",
         f'<span style="{_MONO};white-space:pre">{_esc(r["promotes"])}</span>',
         f'<span style="{_MONO};white-space:pre">{_esc(r["example"])}</span>']
        for r in rows
    ]  # fmt: skip
    return _table(["feature", "density", "max act", "mean act", "promotes", "top example"], cells)


def _example_html(ex: dict, scale: float) -> str:
    spans = "".join(
        _span(t, a, scale, f"act={a:.2f}", ";outline:1.5px solid #c00" if i == ex.get("center") else "")
        for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"]))
    )
    act = f'<span style="{_MUTED}">{float(ex.get("act", 0)):6.2f}  </span>' if "act" in ex else ""
    return f'<div style="{_MONO};white-space:pre;line-height:1.9;overflow-x:auto">{act}{spans}</div>'


def _is_example(x: Any) -> bool:
    return isinstance(x, dict) and isinstance(x.get("tokens"), list) and isinstance(x.get("acts"), list)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# The optional analysis fields, as `sae.site` reads them; a field of another shape is left out of the card.


def _intervals_html(intervals: Any, scale: float) -> str:
    """Samples by activation band: [{"lo", "hi", "count", "examples"}, ...]."""
    parts = []
    for band in intervals if isinstance(intervals, list) else []:
        if not (isinstance(band, dict) and _number(band.get("lo")) and _number(band.get("hi"))):
            continue
        count = f" · {band['count']:,} tokens" if _number(band.get("count")) else ""
        head = f'<div style="{_MUTED};margin-top:4px">act {band["lo"]:.2f} – {band["hi"]:.2f}{count}</div>'
        examples = band.get("examples")
        examples = [ex for ex in examples if _is_example(ex)] if isinstance(examples, list) else []
        parts.append(head + "".join(_example_html(ex, scale) for ex in examples))
    if not parts:
        return ""
    return (
        f'<div><div style="{_MUTED}"><strong>samples by activation band</strong></div>{"".join(parts)}</div>'
    )


def _histogram_html(hist: Any) -> str:
    """Activation histogram {"counts": [n], "edges": [n + 1]} as bars, heights on a log scale (counts fall by
    orders of magnitude from the weakest bin to the strongest)."""
    counts, edges = (hist.get("counts"), hist.get("edges")) if isinstance(hist, dict) else (None, None)
    if not (isinstance(counts, list) and counts and all(map(_number, counts))):
        return ""
    if not (isinstance(edges, list) and len(edges) == len(counts) + 1 and all(map(_number, edges))):
        return ""
    top = max(math.log1p(c) for c in counts) or 1.0
    bars = "".join(
        f'<div title="{lo:.3g} – {hi:.3g}: {c:,} tokens" style="width:6px;margin-right:1px;'
        f'height:{max(1, round(40 * math.log1p(c) / top))}px;background:rgb({RGB})"></div>'
        for c, lo, hi in zip(counts, edges, edges[1:])
    )
    return (f'<div><span style="{_MUTED}">activation histogram {edges[0]:.2f} … {edges[-1]:.2f} (log scale)'
            f'</span><div style="display:flex;align-items:flex-end;height:42px">{bars}</div></div>')  # fmt: skip


def _nearest_html(nearest: Any) -> str:
    """Nearest features by decoder cosine: [[id, cos], ...]."""
    items = nearest if isinstance(nearest, list) else []
    pairs = [p for p in items if isinstance(p, list | tuple) and len(p) == 2 and all(map(_number, p))]
    style = f"{_MONO};background:#eee;padding:0 3px"
    pills = [f'<span style="{style}">#{int(i)} <small>{c:.2f}</small></span>' for i, c in pairs]
    if not pills:
        return ""
    return f'<div><span style="{_MUTED}">nearest (decoder cosine)</span> {" ".join(pills)}</div>'


def feature_card(feature: dict) -> str:
    """One feature as an HTML card: the dashboard's view (density, max and mean activation, logit lens, top
    examples highlighted) and, where the analysis has them, interval samples, the activation histogram and
    the nearest features."""
    scale = float(feature.get("max_act") or 0)
    extras = [
        _histogram_html(feature["histogram"]) if "histogram" in feature else "",
        _nearest_html(feature["nearest"]) if "nearest" in feature else "",
        _intervals_html(feature["intervals"], scale) if "intervals" in feature else "",
    ]
    return f'<div class="sae-card">{dashboard.feature_html(feature)}{"".join(extras)}</div>'
