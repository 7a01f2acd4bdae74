"""Harvest activations, train a sparse autoencoder, evaluate it on held-out text, analyze its features.

    python train.py                                   # SmolLM2-135M, block 15, Wikipedia sample (offline)
    python train.py model.layer=12 sae.k=64 sae.expansion_factor=32
    python train.py model=gpt2 data=hub                # hub model + streamed hub dataset (needs network)
    python train.py data=files data.path='corpus/*.jsonl'
    python train.py -m sae.k=16,32,64                  # a sweep: one run directory per k
    python train.py wandb.mode=online                  # offline (default), online or disabled
    python train.py resume=true                        # continue an interrupted run from its checkpoint
    python train.py run_dir=runs/a overwrite=true      # replace the finished run in runs/a
    torchrun --nproc_per_node=4 train.py               # data-parallel over 4 processes (GPUs, or CPU + gloo)

Writes `run_dir` (default runs/<model>-<layer>-<arch>-k<k>-x<expansion>): sae.safetensors, cfg.json,
run.json, metrics.json, checkpoint/, wandb/, analysis/ and dashboard/ (open dashboard/index.html).
"""

import json
import os
import sys

import hydra
import torch.distributed as dist

from sae.config import TrainJob, register_configs, to_dataclass
from sae.pipeline import run_training
from sae.train import Interrupted, pass_on

register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg) -> None:
    job = to_dataclass(cfg, TrainJob)
    try:
        metrics = run_training(job)
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"{e}\nrun_dir={job.run_dir} is unfinished: run the same command with resume=true to continue "
                "it",
                file=sys.stderr,
            )
        pass_on(e.signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: rank 0 reports
        return
    print(json.dumps(metrics, indent=2))
    print(f"run directory: {job.run_dir}")
    if job.do_analyze:
        print(f"dashboard: {job.run_dir}/dashboard/index.html")


if __name__ == "__main__":
    main()
