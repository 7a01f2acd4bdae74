"""The real YAML configs compose with Hydra and convert to the typed dataclasses; bad values are named."""

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sae.config import (
    AnalyzeJob,
    DataConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
    TrainJob,
    from_dict,
    register_configs,
    sae_variants,
    to_dataclass,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# data=synthetic is a global package (it sets the run directory and a matching SAE size): tested on its own.
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "synthetic")
SAES = sorted(p.stem for p in (CONF / "sae").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def train_job(*overrides: str) -> TrainJob:
    return to_dataclass(compose("train", overrides=list(overrides)), TrainJob)


def yaml_values(group: str, option: str) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    return {k: v for k, v in values.items() if k != "defaults" and v != "???"}


def test_every_option_is_found():
    assert {"tiny", "smollm2", "gpt2"} <= set(MODELS)
    assert {"files", "hub", "wikipedia"} <= set(DATA)
    assert "topk" in SAES


@pytest.mark.parametrize("sae", SAES)
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_every_combination_composes(model, data, sae):
    extra = ["data.path=x.jsonl"] if data == "files" else []
    job = train_job(f"model={model}", f"data={data}", f"sae={sae}", *extra)
    assert isinstance(job, TrainJob)
    assert isinstance(job.model, ModelConfig) and isinstance(job.data, DataConfig)
    assert isinstance(job.sae, SAEConfig) and isinstance(job.train, TrainConfig)
    for group, option in (("model", model), ("data", data), ("sae", sae)):
        node = getattr(job, group)
        for key, value in yaml_values(group, option).items():
            assert getattr(node, key) == value, (group, option, key)
    if data == "files":
        assert job.data.path == "x.jsonl"
    m, s = job.model, job.sae
    assert job.run_dir == f"runs/{m.name}-L{m.layer}-{s.arch}-k{s.k}-x{s.expansion_factor}"


def test_defaults_are_the_offline_demo():
    job = train_job()
    assert job.model.name == "smollm2-135m" and job.model.layer == 15
    assert job.data.path == "wikipedia-sample"
    assert job.train.tokens == 2_500_000 and job.train.batch_size == 1024
    assert job.wandb.mode == "offline"
    assert job.run_dir == "runs/smollm2-135m-L15-topk-k32-x8"


@pytest.mark.parametrize("sae", SAES)
def test_data_synthetic_composes_with_every_architecture(sae):
    job = train_job("data=synthetic", f"sae={sae}")
    assert job.data.path == "synthetic" and job.do_analyze is False
    assert (job.synthetic.n_features, job.synthetic.d_in) == (4096, 256)
    assert job.sae.arch == yaml_values("sae", sae)["arch"]
    assert (job.sae.k, job.sae.expansion_factor) == (12, 4)  # the synthetic size, over the architecture's
    assert job.run_dir == f"runs/synthetic-{job.sae.arch}-k12"
    job = train_job("data=synthetic", "sae.k=20", "synthetic.n_features=16384", "sae.d_sae=4096")
    assert (job.sae.k, job.synthetic.n_features, job.sae.d_sae) == (20, 16384, 4096)


def test_cli_overrides_land_in_the_dataclass():
    job = train_job(
        "model.layer=12",
        "sae.k=64",
        "sae.expansion_factor=32",
        "train.lr=0.002",
        "data=files",
        "data.path=corpus/*.jsonl",
        "wandb.mode=disabled",
        "do_analyze=false",
    )
    assert job.model.layer == 12 and job.sae.k == 64 and job.sae.expansion_factor == 32
    assert job.train.lr == 0.002 and job.data.path == "corpus/*.jsonl"
    assert job.wandb.mode == "disabled" and job.do_analyze is False
    assert job.run_dir == "runs/smollm2-135m-L12-topk-k64-x32"


def test_model_module_override():
    job = train_job("model=tiny", "model.module=resid.1")
    assert job.model.module == "resid.1" and job.model.dtype == "float32"


def test_analyze_config_composes():
    job = to_dataclass(compose("analyze", overrides=["run_dir=x", "analyze.top_k=20"]), AnalyzeJob)
    assert job.run_dir == "x" and job.analyze.top_k == 20 and job.data_path is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("sae.k=0", "sae.k=0"),
        ("sae.expansion_factor=0", "sae.expansion_factor=0"),
        ("sae.b_dec_init=median", "'median'"),
        ("model.dtype=int3", "'int3'"),
        ("model.layer=-1", "model.layer=-1"),
        ("wandb.mode=foo", "'foo'"),
        ("data.context_size=1", "data.context_size=1"),
        ("data.holdout_every=1", "data.holdout_every=1"),
        ("train.decay_fraction=1.5", "1.5"),
        ("train.batch_size=0", "train.batch_size=0"),
        ("train.lr=-1", "train.lr=-1"),
        ("eval.tokens=0", "eval.tokens=0"),
        ("analyze.top_k=0", "analyze.top_k=0"),
        ("analyze.tokens=0", "analyze.tokens=0 must be a number of tokens > 0 or 'all'"),
        ("analyze.tokens=many", "analyze.tokens='many' must be a number of tokens > 0 or 'all'"),
        ("analyze.checkpoint_every=0", "analyze.checkpoint_every=0"),
        ("sae.arch=gated", "'gated'"),
        ("sae.prefixes=[0.5,0.25,1.0]", "sae.prefixes=[0.5, 0.25, 1.0]"),
        ("sae.prefixes=[0.25,0.5]", "ending at 1"),
        ("sae.sparsity_coef=-1", "sae.sparsity_coef=-1"),
        ("sae.bandwidth=0", "sae.bandwidth=0"),
        ("train.grad_clip=-1", "train.grad_clip=-1"),
        ("train.sparsity_warmup=2", "train.sparsity_warmup=2"),
        ("train.eval_every=-1", "train.eval_every=-1"),
        ("saes=[{kk:3}]", "unknown keys ['kk']"),
        ("saes=[{k:16},{k:16}]", "more than once"),
        ("saes=[{k:0}]", "sae.k=0"),
        ("sae.d_sae=1", "sae.d_sae=1"),
        ("synthetic.p_min=0.5", "synthetic.p_min=0.5 and p_max=0.4"),
        ("synthetic.hierarchy_roots=2000", "has 170000 features, more than synthetic.n_features=4096"),
        ("synthetic.n_features=1", "synthetic.n_features=1"),
        ("synthetic.noise=-1", "synthetic.noise=-1"),
    ],
)
def test_bad_values_are_named(override, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        sae_variants(train_job(override))


def test_saes_entries_override_the_selected_sae():
    job = train_job(
        "sae=batchtopk", "sae.expansion_factor=4", "saes=[{k:16},{k:64,arch:topk},{hook:resid.3}]"
    )
    variants = sae_variants(job)
    assert [(v.arch, v.k, v.expansion_factor, v.hook) for v in variants] == [
        ("batchtopk", 16, 4, None),
        ("topk", 64, 4, None),
        ("batchtopk", 32, 4, "resid.3"),
    ]
    assert [v.name for v in variants] == ["batchtopk-k16-x4", "topk-k64-x4", "batchtopk-k32-x4-resid.3"]
    assert sae_variants(train_job()) == [train_job().sae]


@pytest.mark.parametrize("override", ["sae.k=abc", "sae.kk=3", "model.nme=gpt2", "data=nonexistent"])
def test_schema_rejects_bad_types_and_unknown_keys_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=[override])


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(ValueError, match=r"unknown TrainJob keys \['mdoel'\]; accepted: .*'model'"):
        from_dict(TrainJob, {"mdoel": {}})
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['laeyr', 'nme'\]"):
        from_dict(TrainJob, {"model": {"nme": "gpt2", "laeyr": 3}})


def test_from_dict_round_trips_nested_dataclasses():
    job = TrainJob(
        model=ModelConfig(name="tiny", layer=1), sae=SAEConfig(k=4), data=DataConfig(path="x.jsonl")
    )
    assert from_dict(TrainJob, dataclasses.asdict(job)) == job


def test_files_without_a_path_is_an_error_naming_data_path():
    with pytest.raises(Exception, match="path"):
        train_job("data=files")


def test_analyze_without_run_dir_is_an_error_naming_run_dir():
    with pytest.raises(Exception, match="run_dir"):
        to_dataclass(compose("analyze"), AnalyzeJob)


def test_analyze_data_override_from_the_docstring():
    job = to_dataclass(compose("analyze", overrides=["run_dir=x", "data_path=other.jsonl"]), AnalyzeJob)
    assert job.data_path == "other.jsonl"
