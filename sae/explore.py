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

The renderers return HTML strings, each one notebook output (wrap them in `IPython.display.HTML`), drawn with
the fragments of `sae.views`; every piece of token or analysis text in them is escaped. A feature card is the
notebook view of a feature, as `dashboard.feature_html` draws it.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae import dashboard, harvest, views
from sae.config import TrainJob
from sae.data import bos_eos, special_ids
from sae.model import SAE, Code
from sae.rundir import open_run

_SKIPPED = ";color:#aaa;text-decoration:line-through"  # a token the SAE did not encode, in a text's view


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

    def __init__(
        self,
        run_dir: Path,
        job: TrainJob,
        sae: SAE,
        model,
        tokenizer,
        module: str,
        analysis: dict | None,
        metrics: dict | None,
    ):
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
            ranked.append(
                {
                    "id": f,
                    "total": round(total[f].item(), 4),
                    "max": round(peak[f].item(), 4),
                    "tokens": int(fired[f]),
                    "density": info.get("density"),
                    "max_act": info.get("max_act"),
                    "promotes": [t for t, _ in info.get("top_logits", [])[:5]],
                    "example": snippet(info),
                }
            )
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
        {
            "id": f["id"],
            "density": f["density"],
            "max_act": f["max_act"],
            "mean_act": f["mean_act"],
            "promotes": " ".join(repr(t) for t, _ in f.get("top_logits", [])[:5]),
            "example": snippet(f),
        }
        for f in analysis["features"]
    ]


# --- HTML -----------------------------------------------------------------------------------------------


def _density(d: float | None) -> str:
    return "-" if d is None else ("dead" if d <= 0 else f"{100 * d:.3g}%")


def _text(s: str) -> str:
    return f'<span class="t">{views.token_text(s)}</span>'


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return views.notebook(f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


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
            spans.append(views.shade(token, act, scale, f"{token!r}  feature {feature}: {act:.3f}"))
        else:
            title = f"{token!r}  skipped: special token or massive activation, not encoded"
            spans.append(views.shade(token, 0.0, 1.0, title, _SKIPPED))
    head = f"feature {feature}: max {max(acts):.2f} on this text, shading relative to {scale:.2f}"
    body = f'<div class="t wrap">{"".join(spans)}</div>'
    return views.notebook(f'<div class="sae-text"><div class="muted">{head}</div>{body}</div>')


def tokens_html(found: TextFeatures, top: int = 5) -> str:
    """The per-token table: each token and its `top` strongest features, shaded by their activation."""
    scale = float(found.code.acts.max()) if found.code.acts.numel() else 0.0
    rows = []
    for r in found.per_token(top):
        pills = " ".join(
            views.shade(f"#{f} {a:.2f}", a, scale, f"feature {f}: {a:.3f}") for f, a in r["features"]
        )
        state = "" if r["kept"] else '<span class="muted">skipped</span>'
        token = f'<span class="pill">{views.token_text(r["token"])}</span>'
        rows.append([str(r["pos"]), token, f'<span class="t">{pills}</span>{state}'])
    return _table(["pos", "token", f"top {top} features (id act)"], rows)


def ranked_html(found: TextFeatures) -> str:
    """The features ranked on the text: activation here, density and what the analysis says of them."""
    rows = [
        [
            str(i + 1),
            f"<strong>{r['id']}</strong>",
            f"{r['total']:.2f}",
            f"{r['max']:.2f}",
            str(r["tokens"]),
            _density(r["density"]),
            _text(" ".join(map(repr, r["promotes"]))),
            _text(r["example"]),
        ]
        for i, r in enumerate(found.ranked)
    ]
    header = ["rank", "feature", "total", "max", "tokens", "density", "promotes", "top example"]
    return _table(header, rows)


def index_html(analysis: dict, n: int = 20, sort: str = "max_act") -> str:
    """A table of `n` features sorted by `sort` (max_act, density, mean_act: largest first; id)."""
    if sort not in ("max_act", "density", "mean_act", "id"):
        raise ValueError(f"sort={sort!r}; accepted: 'max_act', 'density', 'mean_act' or 'id'")
    rows = sorted(feature_rows(analysis), key=lambda r: r["id"] if sort == "id" else -r[sort])[:n]
    cells = [
        [
            f"<strong>{r['id']}</strong>",
            _density(r["density"]),
            f"{r['max_act']:.2f}",
            f"{r['mean_act']:.2f}",
            _text(r["promotes"]),
            _text(r["example"]),
        ]
        for r in rows
    ]
    return _table(["feature", "density", "max act", "mean act", "promotes", "top example"], cells)


def feature_card(feature: dict) -> str:
    """One feature as an HTML card: density, max and mean activation, the activation histogram, logit lens,
    top examples highlighted, samples by activation band and the nearest features, each optional field only
    where the analysis has it."""
    return dashboard.feature_html(feature)
