"""Analysis results in a notebook: loading `features.json` and HTML of features.

    sae.dashboard.show("runs/demo", n=5)          # the five strongest live features, inline
    sae.dashboard.show("runs/demo", [12, 40])     # features by id

The browsable site of every feature is `sae.site`; both draw a feature with the fragments of `sae.views`.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from sae import views
from sae.views import density_text, token_text

__all__ = [
    "analysis_path",
    "density_text",
    "feature_html",
    "load_analysis",
    "show",
    "token_text",
    "top_features",
]


def analysis_path(run_dir: str | Path) -> Path:
    """`run_dir/analysis/features.json`, the result of `analyze.py`; an error saying what to run if it is missing."""
    path = Path(run_dir) / "analysis" / "features.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no analysis at {path}: run `python analyze.py run_dir={run_dir}` first to write it"
        )
    return path


def load_analysis(run_dir: str | Path) -> dict:
    """Read `run_dir/analysis/features.json`, the result of `analyze.py`."""
    return json.loads(analysis_path(run_dir).read_text(encoding="utf-8"))


def top_features(analysis: dict, n: int) -> list[dict]:
    """The `n` live features (density > 0) with the highest max activation, strongest first."""
    live = [f for f in analysis["features"] if f["density"] > 0]
    return sorted(live, key=lambda f: -f["max_act"])[:n]


def feature_html(feature: dict) -> str:
    """One feature as a notebook output: statistics, histogram, logit lens, top examples, bands, nearest."""
    return views.notebook(views.card(feature))


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
    display(HTML(views.notebook("".join(views.card(f) for f in feats))))
