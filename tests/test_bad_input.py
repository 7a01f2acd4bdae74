"""Bad input fails with a message naming the bad value and what is accepted, and leaves nothing half-written:
training jobs on the tiny model, and corrupt, truncated or mismatched SAE files."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from safetensors.torch import save_file

from sae.config import ModelConfig, SAEConfig, TrainJob
from sae.explore import Explorer
from sae.model import CONFIG, SAE, WEIGHTS
from sae.pipeline import run_training


def _fails_cleanly(job: TrainJob, error: type[Exception], words: list[str]) -> str:
    with pytest.raises(error) as info:
        run_training(job)
    message = str(info.value)
    for word in words:
        assert word in message, message
    run = Path(job.run_dir)
    assert not run.exists() and not list(run.parent.glob("*.tmp"))
    return message


# --- training jobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"model": {"module": "model.layer.1"}}, ValueError, ["model.layer.1", "model.layers.1"]),
        ({"model": {"layer": 9}}, ValueError, ["9", "out of range", "4 blocks"]),
        ({"data": {"text_column": "body"}}, ValueError, ["data.text_column='body'", "columns: ['text']"]),
        ({"sae": {"k": 128}}, ValueError, ["sae.k=128", "smaller than", "d_sae=128"]),
        (
            {"train": {"batch_size": 4096}},
            ValueError,
            ["2048 tokens", "train.batch_size=4096", "train.harvest_tokens"],
        ),
    ],
    ids=["unknown-module", "layer-out-of-range", "missing-text-column", "k-at-d_sae", "batch-over-harvest"],
)
def test_bad_job_fails_before_leaving_anything(tmp_path, corpus, changes, error, words):
    _fails_cleanly(tiny_job(tmp_path, corpus, **changes), error, words)


def _empty(d: Path) -> Path:
    (d / "empty.jsonl").write_text("")
    return d / "empty.jsonl"


def _blank(d: Path) -> Path:
    (d / "blank.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    return d / "blank.jsonl"


def _numbers(d: Path) -> Path:
    (d / "numbers.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(50)))
    return d / "numbers.jsonl"


def _directory(d: Path) -> Path:
    (d / "dir.jsonl").mkdir()
    return d / "dir.jsonl"


def _broken_link(d: Path) -> Path:
    os.symlink(d / "gone.jsonl", d / "link.jsonl")
    return d / "link.jsonl"


def _bad_parquet(d: Path) -> Path:
    (d / "bad.parquet").write_bytes(b"not a parquet file")
    return d / "bad.parquet"


def _bad_json(d: Path) -> Path:
    (d / "bad.jsonl").write_text('{"text": "abc"\n{oops\n')
    return d / "bad.jsonl"


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (_empty, ValueError, ["empty.jsonl", "empty (0 bytes)"]),
        (_blank, ValueError, ["blank.jsonl", "fewer than one batch", "2 rows read, 0 of them with text"]),
        (_numbers, TypeError, ["data.text_column='text'", "int values", "not text"]),
        (_directory, FileNotFoundError, ["dir.jsonl", "directory holding no data files", "accepted"]),
        (_broken_link, FileNotFoundError, ["link.jsonl", "broken symbolic link", "give an existing file"]),
        (_bad_parquet, ValueError, ["bad.parquet", "as parquet rows", "corrupt"]),
        (_bad_json, ValueError, ["bad.jsonl", "truncated or corrupt"]),
    ],
    ids=[
        "empty-file",
        "only-empty-strings",
        "numbers",
        "directory",
        "broken-symlink",
        "corrupt-parquet",
        "corrupt-jsonl",
    ],
)
def test_bad_corpus_fails_before_leaving_anything(tmp_path, make, error, words):
    (tmp_path / "data").mkdir()
    _fails_cleanly(tiny_job(tmp_path, make(tmp_path / "data")), error, words)


def test_streamed_batch_over_the_shuffle_buffer_fails_clearly(tmp_path, corpus):
    _fails_cleanly(
        tiny_job(tmp_path, corpus, train={"batch_size": 4096, "in_memory": False}),
        ValueError,
        ["train.batch_size=4096", "train.buffer_tokens=1024"],
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [("k", "sae.k=0 must be >= 1"), ("expansion_factor", "sae.expansion_factor=0 must be >= 1")],
)
def test_zero_sizes_are_rejected_by_the_config(field, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{field: 0})


# --- SAE files ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    SAE(16, 64, k=4).save(tmp_path / "sae", extra={"hook": "model.layers.1"})
    return tmp_path / "sae"


def _cfg(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG).read_text()) | changes
    (path / CONFIG).write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def _load_error(path: Path, *words: str, error: type[Exception] = ValueError) -> str:
    with pytest.raises(error) as info:
        SAE.load(path)
    for word in words:
        assert word in str(info.value), str(info.value)
    return str(info.value)


def test_truncated_weights_are_named(saved):
    weights = saved / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    _load_error(saved, str(weights), "truncated or corrupt")


def test_corrupt_weights_are_named(saved):
    (saved / WEIGHTS).write_bytes(b"garbage" * 20)
    _load_error(saved, str(saved / WEIGHTS), "truncated or corrupt")


def test_truncated_config_is_named(saved):
    text = (saved / CONFIG).read_text()
    (saved / CONFIG).write_text(text[: len(text) // 2])
    _load_error(saved, str(saved / CONFIG), "not valid JSON")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"d_sae": None}, ["lacks key 'd_sae'"]),
        ({"k": "4"}, ["k='4' must be a positive integer"]),
        ({"d_in": 0}, ["d_in=0 must be a positive integer"]),
        ({"arch": "gated"}, ["arch='gated' is not one of"]),
        ({"k": 64}, ["sae.k=64", "d_sae=64"]),
    ],
)
def test_bad_config_keys_are_named(saved, changes, words):
    _cfg(saved, **changes)
    _load_error(saved, str(saved / CONFIG), *words)


def test_config_disagreeing_with_the_weights_names_the_tensor(saved):
    _cfg(saved, d_sae=4608)
    _load_error(saved, str(saved / WEIGHTS), "'W_dec'", "[64, 16]", "[4608, 16]", "d_sae=4608")


def test_a_tensor_of_the_wrong_shape_is_named(saved):
    sae = SAE(16, 64, k=4)
    tensors = {k: v for k, v in sae.state_dict().items() if k != "encoder"} | {"W_enc": sae.W_enc}
    tensors["W_dec"] = torch.zeros(100, 16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(saved / WEIGHTS))
    _load_error(saved, "'W_dec'", "[100, 16]", "expects [64, 16]")


def test_a_missing_tensor_is_named(saved):
    sae = SAE(16, 64, k=4)
    save_file({"W_enc": sae.W_enc.contiguous(), "b_enc": sae.b_enc.detach()}, str(saved / WEIGHTS))
    _load_error(saved, "lacks tensor 'W_dec'", "[64, 16]")


def test_an_sae_of_another_width_than_the_model_fails_to_load(tmp_path):
    """The tiny model's residual stream is 64 wide; this SAE reads 16."""
    run = tmp_path / "run"
    SAE(16, 64, k=4).save(run, extra={"hook": "model.layers.1"})
    job = TrainJob(model=ModelConfig(name="tiny", dtype="float32", device="cpu", layer=1))
    (run / "run.json").write_text(json.dumps(dataclasses.asdict(job)))
    with pytest.raises(ValueError) as info:
        Explorer.load(run)
    for word in ("d_in=16", "model.layers.1", "model.name='tiny'", "width 64"):
        assert word in str(info.value), str(info.value)


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 sets it
    _fails_cleanly(
        tiny_job(tmp_path, corpus),
        ValueError,
        ["train.batch_size=256", "3 data-parallel processes", "a multiple of 3"],
    )
