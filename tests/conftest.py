"""Shared fixtures: the device under test, the tiny random Llama with its byte-level tokenizer, a few English
sentences, a slice of the real Wikipedia sample as a local corpus, and an analysis of random sparse codes for
sites of many features.

Tests where a GPU changes behaviour (SAE forward and backward, training steps, harvest, evaluation) take the
`device` fixture: the CPU unless `SAE_TEST_DEVICE` names another, e.g. `SAE_TEST_DEVICE=cuda python -m pytest`
(what `bench/gpu.sh` runs on a CUDA machine). The rest run on the CPU whatever it says.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from sae.analyze import FeatureStats, save_analysis
from sae.cache import FORMAT, ActivationCache
from sae.config import AnalyzeConfig, DataConfig, ModelConfig, SAEConfig, TrainConfig, TrainJob, WandbConfig
from sae.data import Contexts, wikipedia_sample
from sae.files import save_tensors, write_json
from sae.harvest import load_model, tiny_tokenizer
from sae.model import Code

SENTENCES = [
    "The cat sat on the warm mat by the kitchen door.",
    "Rivers carry sediment from the mountains down to the sea.",
    "She bought three apples, two pears and a loaf of bread.",
    "The committee will meet again on Thursday afternoon.",
    "Light travels faster than sound through the open air.",
    "My grandfather planted an oak tree in nineteen fifty-two.",
    "Please close the window before the rain comes in.",
    "The library opens at nine and closes at six.",
    "A small boat drifted slowly across the quiet harbour.",
    "Engineers tested the bridge with heavy trucks last week.",
    "He forgot his umbrella and walked home in the storm.",
    "The recipe calls for flour, butter, sugar and eggs.",
    "Birds migrate south when the days grow short and cold.",
    "The old clock in the hall struck midnight.",
    "Children played football in the park until sunset.",
    "The museum displays paintings from the sixteenth century.",
    "Our train was delayed by twenty minutes this morning.",
    "Volcanoes form where magma rises through the crust.",
    "She wrote a long letter to her friend in Lisbon.",
    "The farmer sold his wheat at the market on Saturday.",
    "Snow covered the hills for most of the winter.",
    "The orchestra played a symphony by Beethoven.",
    "Bees collect nectar and carry pollen between flowers.",
    "The lawyer asked the witness a difficult question.",
    "A strong wind blew the leaves across the road.",
    "The students read two chapters before the exam.",
    "Copper is an excellent conductor of electricity.",
    "They painted the fence white during the summer holidays.",
    "The bakery on the corner sells fresh bread every day.",
    "Whales communicate with songs that travel for miles.",
    "The king signed the treaty in the great hall.",
    "Her brother repairs bicycles in a small workshop.",
]


DEVICE_VARIABLE = "SAE_TEST_DEVICE"


def device_under_test() -> torch.device:
    """The device `$SAE_TEST_DEVICE` names (default cpu): `cpu`, `cuda` (cuda:0) or `cuda:N`. Raises
    pytest.UsageError naming the value when it is no torch device, or a CUDA one this machine does not have."""
    value = os.environ.get(DEVICE_VARIABLE) or "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise pytest.UsageError(
            f"{DEVICE_VARIABLE}={value!r} is not a torch device: use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise pytest.UsageError(f"{DEVICE_VARIABLE}={value!r}: the tests run on cpu or cuda[:N] only")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise pytest.UsageError(
            f"{DEVICE_VARIABLE}={value!r}, but CUDA is not available here (torch {torch.__version__}, {built}); "
            f"unset {DEVICE_VARIABLE} to test on the CPU"
        )
    # `cuda` is the current device, cuda:0 in a fresh process (torch.cuda.current_device() would set up
    # CUDA in the pytest process before any test, and forked processes could not use it after that).
    index = device.index if device.index is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise pytest.UsageError(
            f"{DEVICE_VARIABLE}={value!r}, but this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}"
        )
    return torch.device("cuda", index)  # with its index, so that it equals the device of tensors placed on it


def pytest_configure(config) -> None:
    device_under_test()  # a bad SAE_TEST_DEVICE stops the session before the first test, not at each one


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test (`$SAE_TEST_DEVICE`, default cpu)."""
    return device_under_test()


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the 4-block random Llama in float32 on the CPU, eval mode, no gradients."""
    return load_model(ModelConfig(name="tiny", dtype="float32", device="cpu"))


@pytest.fixture(scope="session")
def tiny_on_device(tiny, device):
    """(model, tokenizer): the tiny random Llama of `tiny` (the same weights, float32) on the device under test."""
    if device.type == "cpu":
        return tiny
    return load_model(ModelConfig(name="tiny", dtype="float32", device=str(device)))


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A slice of the real Wikipedia sample as a local JSON-lines file."""
    rows = [json.loads(line) for line in wikipedia_sample().read_text().splitlines()[:40]]
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"][:3000]}) + "\n" for r in rows))
    return path


def tiny_job(tmp_path: Path, corpus: Path, **changes) -> TrainJob:
    """A TrainJob that runs in seconds: the tiny model on `corpus`, no W&B, no analysis; `changes` sets fields
    of its groups, e.g. `train={"in_memory": False}`."""
    job = TrainJob(
        model=ModelConfig(name="tiny", dtype="float32", layer=1, batch_size=4),
        data=DataConfig(path=str(corpus), context_size=64),
        sae=SAEConfig(k=8, expansion_factor=2),
        train=TrainConfig(tokens=2048, harvest_tokens=2048, batch_size=256, buffer_tokens=1024),
        wandb=WandbConfig(mode="disabled"),
        run_dir=str(tmp_path / "run"),
        do_analyze=False,
    )
    for group, values in changes.items():
        for key, value in values.items():
            setattr(getattr(job, group), key, value)
    job.eval.tokens, job.eval.loss_contexts = 1024, 0
    return job


def handmade_cache(path: Path, chunks: list[torch.Tensor], module: str = "m") -> ActivationCache:
    """A complete activation cache of `module` written by hand: shard i holds chunks[i] [n, D] float32 as
    context batch i, one context of n positions, all of them cached."""
    listed = []
    for b, x in enumerate(chunks):
        n, name = len(x), f"shard-{b:08d}.safetensors"
        pos, true = torch.arange(n, dtype=torch.int32)[None], torch.ones(1, n, dtype=torch.bool)  # [1, n]
        contexts = {"ids": pos, "row": pos.long(), "pos": pos.clone(), "mask": true, "used": true.clone()}
        tensors = {f"contexts.{k}": v for k, v in contexts.items()} | {"contexts.batch": torch.tensor([b])}
        save_tensors(path / name, tensors | {f"acts.{module}": x})
        listed.append({"file": name, "tokens": n, "batches": [b], "batch_tokens": [n]})
    meta = {"provenance": {"modules": [module], "cache_format": FORMAT}, "dtype": "float32"}
    meta |= {"d_in": {module: chunks[0].shape[1]}, "shard_tokens": len(chunks[0]), "shards": listed}
    meta |= {"batches": len(chunks), "tokens": sum(len(x) for x in chunks), "complete": True}
    write_json(path / "meta.json", meta)
    return ActivationCache(path)


def random_analysis(run_dir: Path, n_features: int, seed: int = 0) -> Path:
    """Writes `run_dir/analysis/` as `analyze.py` would, for `n_features` latents of random sparse codes (8 a
    token, about 20 firings a feature, every 50th feature dead) on random byte tokens: the real code path
    (`FeatureStats`, `save_analysis`, with random logit-lens tokens and nearest features) with 3 top examples and
    2 bands of 1 sample a feature, so that a few thousand features take a second. Returns the analysis file."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = tiny_tokenizer()
    cfg = AnalyzeConfig(tokens=1, top_k=3, intervals=2, per_interval=1, window_before=4, window_after=2)
    stats = FeatureStats(n_features, cfg)
    rate = torch.rand(n_features, generator=g) + 0.1  # [F]
    rate[::50] = 0
    N, T, K = 64, 32, 8
    for b in range(n_features * 20 // (N * (T - 1) * K) + 1):
        ids = torch.randint(2, len(tokenizer), (N, T), generator=g)
        ids[:, 0] = 0  # BOS
        mask = ids > 1
        row = torch.where(mask, b * N + torch.arange(N)[:, None], -1)
        pos = torch.where(mask, torch.arange(T) - 1, -1)
        B = int(mask.sum())
        idx = torch.multinomial(rate, B * K, replacement=True, generator=g).view(B, K).sort(dim=1).values
        acts = 10 * torch.rand(B, K, generator=g)  # [B, K]
        acts[:, 1:][idx[:, 1:] == idx[:, :-1]] = 0  # a latent drawn twice for a token: padding
        stats.update(Code(acts, idx), mask, Contexts(ids=ids, row=row, pos=pos, mask=mask))
    k = cfg.logit_k
    ups = torch.rand(n_features, k, generator=g).sort(dim=1, descending=True).values
    V = len(tokenizer)
    lens = (
        ups,
        torch.randint(2, V, (n_features, k), generator=g),
        -ups,
        torch.randint(2, V, (n_features, k), generator=g),
    )
    cos = torch.rand(n_features, cfg.nearest, generator=g).sort(dim=1, descending=True).values
    nearest = (cos, torch.randint(0, n_features, (n_features, cfg.nearest), generator=g))
    meta = {
        "model": "random codes",
        "hook": "model.layers.1",
        "arch": "topk",
        "d_in": 64,
        "d_sae": n_features,
        "k": K,
    }
    return save_analysis(stats, run_dir, tokenizer, meta, lens, nearest) / "features.json"


ROOT = Path(__file__).resolve().parents[1]


def process_env() -> dict:
    """The environment of the test's own `train.py` / `analyze.py` processes: quiet W&B, full Hydra errors, one
    torch thread per process."""
    return os.environ | {"WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}


def run_to_the_end(cmd: list[str]) -> subprocess.CompletedProcess:
    """Runs `cmd` (torchrun or a script) from the repository root to the end and asserts it succeeded; on a
    timeout its whole process group is killed, so torchrun's workers are not left waiting for each other."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
