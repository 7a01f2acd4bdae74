"""Analyze a trained SAE's features on its corpus and write the dashboard site.

    python analyze.py run_dir=runs/demo                             # the whole corpus
    python analyze.py run_dir=runs/demo analyze.tokens=200000 analyze.top_k=20
    python analyze.py run_dir=runs/demo resume=true                # continue an interrupted analysis
    torchrun --nproc_per_node=8 analyze.py run_dir=runs/demo        # data-parallel, merged on rank 0
    python analyze.py run_dir=runs/demo data_path=other.jsonl      # the rows of another corpus
    python analyze.py run_dir=runs/gpt2-l8 sae_dir=path/to/saelens-sae model.name=gpt2   # a SAELens SAE

Writes <run_dir>/analysis/features.{safetensors,json} and the dashboard site <run_dir>/dashboard/: open its
index.html in a browser, or serve it with `python -m sae.site <run_dir> --serve`.
"""

import hydra

from sae.config import AnalyzeJob, register_configs, to_dataclass
from sae.pipeline import run_analysis

register_configs()


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
def main(cfg) -> None:
    path = run_analysis(to_dataclass(cfg, AnalyzeJob))
    if path is not None:  # rank 0 of a data-parallel analysis, or the only process
        print(f"dashboard: {path}")


if __name__ == "__main__":
    main()
