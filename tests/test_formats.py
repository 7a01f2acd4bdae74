"""Export to SAELens and Neuronpedia, import from SAELens, W&B artifacts.

SAELens' inference is written out below (`saelens_reference`, from sae_lens/saes/{topk,jumprelu,standard}_sae.py
of sae-lens 6.54.12) so the round trips are checked without it installed; where it is installed, the last tests
load our exports with SAELens itself and import SAEs SAELens saved.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import tracking
from sae.config import (
    ARCHS,
    AnalyzeConfig,
    AnalyzeJob,
    DataConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
    TrainJob,
    WandbConfig,
)
from sae.formats import from_saelens, main, module_for_hook, saelens_hook, to_neuronpedia, to_saelens
from sae.model import SAE

D, F = 16, 64

# What SAELens 6.x needs in cfg.json to load an SAE as we mean it (sae_lens/saes/sae.py SAE.load_from_disk and
# SAEConfig, loading/pretrained_sae_loaders.py). Loading fails without architecture, d_in, d_sae and dtype; a
# metadata.sae_lens_version below 6 sends the config through the pre-6.0 converter; the others have SAELens
# defaults, written out so that a change of default cannot change what the file means.
SAELENS_REQUIRED = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
}
SAELENS_TOPK_REQUIRED = {"k", "rescale_acts_by_decoder_norm"}  # k defaults to 100 in SAELens
SAELENS_METADATA = {
    "sae_lens_version",
    "model_name",
    "hook_name",
    "hf_hook_name",
    "context_size",
    "prepend_bos",
    "model_from_pretrained_kwargs",
}


def saelens_reference(
    cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [B, F], reconstruction [B, D]) as SAELens 6.x computes them from a cfg.json and its tensors."""
    h = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]  # [B, F]
    scale = torch.ones(h.shape[1])
    if cfg["architecture"] == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            scale = t["W_dec"].norm(dim=1)
        values, idx = (h * scale).topk(cfg["k"], dim=-1)
        z = torch.zeros_like(h).scatter(-1, idx, values.relu())
    elif cfg["architecture"] == "jumprelu":
        z = h.relu() * (h > t["threshold"])
    else:
        z = h.relu()
    return z, (z / scale) @ t["W_dec"] + t["b_dec"]


def _sae(arch: str, seed: int = 0, d_in: int = D, d_sae: int = F) -> SAE:
    """A random SAE with non-trivial biases and thresholds (so each term of the maths is exercised)."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae, 4, arch=arch, prefixes=(d_sae // 4, d_sae), seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.5)
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 1.5)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.8)
    return sae


def _saved(tmp_path: Path, arch: str, **extra) -> tuple[SAE, Path]:
    sae = _sae(arch)
    sae.save(tmp_path / arch, extra={"model": "tiny", "hook": "model.layers.2", "context_size": 64} | extra)
    return sae, tmp_path / arch


def _x(n: int = 200, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_round_trip_keeps_codes_and_reconstructions(tmp_path, arch):
    sae, run = _saved(tmp_path, arch)
    out = to_saelens(run, tmp_path / "saelens")
    assert {p.name for p in out.iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    cfg, t = json.loads((out / "cfg.json").read_text()), load_file(str(out / "sae_weights.safetensors"))
    x = _x()
    with torch.no_grad():
        z, x_hat = sae.dense(sae.encode(x)), sae(x).x_hat
        z_ref, x_hat_ref = saelens_reference(cfg, t, x)
        back, meta = from_saelens(out)
        z_back, x_hat_back = back.dense(back.encode(x)), back(x).x_hat
    assert torch.equal(z_ref, z) and torch.equal(z_back, z)  # the same latents fire with the same values
    torch.testing.assert_close(x_hat_ref, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat_back, x_hat, atol=1e-5, rtol=1e-5)
    assert (z > 0).any() and ((z > 0).sum(1) < F).all()
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["hf_hook_name"] == "model.layers.2"
    assert module_for_hook(meta["hook_name"]) == "resid.2" and meta["model_name"] == "tiny"


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_config_has_the_keys_saelens_6_requires(tmp_path, arch):
    _, run = _saved(tmp_path, arch)
    cfg = json.loads((to_saelens(run, tmp_path / "saelens") / "cfg.json").read_text())
    assert SAELENS_REQUIRED <= set(cfg) and SAELENS_METADATA <= set(cfg["metadata"])
    assert cfg["architecture"] == {"topk": "topk", "relu": "standard"}.get(arch, "jumprelu")
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, F, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["metadata"]["context_size"] == 64 and cfg["metadata"]["training_architecture"] == arch
    if arch == "topk":
        assert (
            SAELENS_TOPK_REQUIRED <= set(cfg)
            and cfg["k"] == 4
            and cfg["rescale_acts_by_decoder_norm"] is False
        )
    if arch in ("batchtopk", "matryoshka"):  # one scalar threshold becomes JumpReLU's per-latent thresholds
        threshold = load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))["threshold"]
        assert threshold.shape == (F,) and torch.all(threshold == 0.8)


def test_saelens_export_carries_the_feature_density_and_fills_in_missing_metadata(tmp_path):
    sae = _sae("topk")
    sae.save(tmp_path / "run")  # an SAE saved outside train.py: no model or hook in cfg.json
    density = torch.rand(F)
    (tmp_path / "run" / "analysis").mkdir()
    save_file({"density": density}, str(tmp_path / "run" / "analysis" / "features.safetensors"))
    out = to_saelens(tmp_path / "run", tmp_path / "out", model="smollm2-135m", hook="model.layers.15")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "smollm2-135m" and meta["hook_name"] == "blocks.15.hook_resid_post"
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]  # SAELens' log10 feature density
    torch.testing.assert_close(sparsity, torch.log10(density + 1e-10))


def test_hook_names_map_both_ways():
    assert saelens_hook("model.layers.15") == "blocks.15.hook_resid_post"
    assert saelens_hook("transformer.h.3") == "blocks.3.hook_resid_post"
    assert saelens_hook("resid.7") == "blocks.7.hook_resid_post"
    assert saelens_hook("model.layers.9.mlp") == "model.layers.9.mlp"  # no TransformerLens name: kept
    assert module_for_hook("blocks.15.hook_resid_post") == "resid.15"
    assert module_for_hook("blocks.15.hook_resid_pre") == "resid.14"
    assert module_for_hook("blocks.9.hook_mlp_out", "model.layers.9.mlp") == "model.layers.9.mlp"
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre.*embeddings.*model\.module"):
        module_for_hook("blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match=r"'blocks\.3\.hook_attn_out'.*hook_resid_post.*hook_resid_pre"):
        module_for_hook("blocks.3.hook_attn_out")


def _write_saelens(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _saelens_tensors(arch: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights as SAELens might hold them: decoder rows far from unit norm, thresholds for jumprelu."""
    t = {
        "W_enc": torch.randn(D, F, generator=g) * 0.3,
        "b_enc": torch.randn(F, generator=g) * 0.3,
        "W_dec": torch.randn(F, D, generator=g) * torch.rand(F, 1, generator=g) * 3,
        "b_dec": torch.randn(D, generator=g),
    }
    if arch == "jumprelu":
        t["threshold"] = torch.rand(F, generator=g)
    return t


@pytest.mark.parametrize(
    ("arch", "apply_b_dec", "rescale"),
    [
        ("topk", True, True),
        ("topk", False, True),
        ("topk", False, False),
        ("jumprelu", False, False),
        ("standard", False, False),
        ("standard", True, False),
    ],
)
def test_from_saelens_folds_run_time_options_into_the_weights(tmp_path, arch, apply_b_dec, rescale):
    cfg = {
        "architecture": arch,
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.1.hook_resid_pre"},
    }
    if arch == "topk":
        cfg |= {"k": 6, "rescale_acts_by_decoder_norm": rescale}
    t = _saelens_tensors(arch, torch.Generator().manual_seed(2))
    sae, meta = from_saelens(_write_saelens(tmp_path / "sl", cfg, t))
    x = _x()
    with torch.no_grad():
        z_ref, x_hat_ref = saelens_reference(cfg, t, x)
        torch.testing.assert_close(sae.dense(sae.encode(x)), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).x_hat, x_hat_ref, atol=1e-4, rtol=1e-4)
    assert (
        sae.arch == {"standard": "relu"}.get(arch, arch) and module_for_hook(meta["hook_name"]) == "resid.0"
    )


def test_from_saelens_reads_a_pre_6_config(tmp_path):
    cfg = {
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 5},
        "hook_point": "blocks.4.hook_resid_post",
        "model_name": "gpt2-small",
        "normalize_activations": False,
    }
    sae, meta = from_saelens(
        _write_saelens(tmp_path / "old", cfg, _saelens_tensors("topk", torch.Generator()))
    )
    assert sae.arch == "topk" and sae.k == 5 and meta["hook_name"] == "blocks.4.hook_resid_post"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"architecture": "gated"}, ["'gated'", "topk", "jumprelu", "standard"]),
        ({"normalize_activations": "layer_norm"}, ["normalize_activations='layer_norm'", "'none'"]),
        ({"reshape_activations": "hook_z"}, ["attention heads"]),
        ({"tensors": {"extra": torch.zeros(3)}}, ["extra", "W_enc"]),
        ({"tensors": {"W_enc": torch.zeros(D + 1, F)}}, ["W_enc", f"[{D + 1}, {F}]", f"[{D}, {F}]"]),
        ({"tensors": {"scaling_factor": torch.full((F,), 2.0)}}, ["scaling_factor"]),
    ],
)
def test_from_saelens_refuses_what_it_cannot_import_faithfully(tmp_path, change, words):
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "metadata": {"sae_lens_version": "6.0.0"},
    }
    tensors = _saelens_tensors("standard", torch.Generator()) | change.pop("tensors", {})
    with pytest.raises(ValueError) as info:
        from_saelens(_write_saelens(tmp_path / "sl", cfg | change, tensors))
    for word in words:
        assert word in str(info.value)


def test_from_saelens_names_what_a_directory_lacks(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cfg\.json.*sae_weights\.safetensors"):
        from_saelens(tmp_path)


def _features_json(run: Path, extra: dict | None = None) -> dict:
    example = {
        "act": 2.5,
        "row": 7,
        "pos": 3,
        "tokens": ["The", " cat", " sat"],
        "acts": [0.0, 2.5, 3.1],
        "center": 1,
    }
    feature = {
        "id": 0,
        "density": 0.01,
        "max_act": 3.1,
        "mean_act": 1.2,
        "examples": [example],
        "top_logits": [[" dog", 1.5], [" mat", 1.2]],
        "bottom_logits": [[" the", -0.7]],
    } | (extra or {})
    dead = {"id": 1, "density": 0.0, "max_act": 0.0, "mean_act": 0.0, "examples": []}
    analysis = {
        "model": "smollm2-135m",
        "hook": "model.layers.15",
        "arch": "topk",
        "d_sae": 2,
        "n_tokens": 1000,
        "features": [feature, dead],
    }
    (run / "analysis").mkdir(parents=True)
    (run / "analysis" / "features.json").write_text(json.dumps(analysis))
    return analysis


def test_neuronpedia_export_has_its_feature_and_activation_rows(tmp_path):
    _features_json(tmp_path / "run")
    out = json.loads(to_neuronpedia(tmp_path / "run", tmp_path / "np.json").read_text())
    assert (out["modelId"], out["layer"], out["sourceSetName"]) == ("smollm2-135m", "15-sae-topk", "sae-topk")
    assert out["hookName"] == "blocks.15.hook_resid_post" and out["n_tokens"] == 1000
    feature, dead = out["features"]
    assert (feature["modelId"], feature["layer"], feature["index"]) == ("smollm2-135m", "15-sae-topk", "0")
    assert feature["frac_nonzero"] == 0.01 and feature["maxActApprox"] == 3.1
    assert feature["pos_str"] == [" dog", " mat"] and feature["pos_values"] == [1.5, 1.2]
    assert feature["neg_str"] == [" the"] and feature["neg_values"] == [-0.7]
    assert dead["index"] == "1" and dead["pos_str"] == [] and dead["frac_nonzero"] == 0.0
    (act,) = out["activations"]
    assert (act["modelId"], act["layer"], act["index"]) == ("smollm2-135m", "15-sae-topk", "0")
    assert act["tokens"] == ["The", " cat", " sat"] and act["values"] == [0.0, 2.5, 3.1]
    assert (act["maxValue"], act["maxValueTokenIndex"], act["minValue"]) == (3.1, 2, 0.0)
    assert act["qualifyingTokenIndex"] == 1 and act["dataIndex"] == "7"
    assert (act["binMin"], act["binMax"], act["binContains"]) == (-1.0, 3.1, -1.0)  # SAEDashboard's top bin


def test_neuronpedia_export_uses_histograms_intervals_and_neighbours_when_present(tmp_path):
    """The shapes sae/analyze.py writes: intervals [{lo, hi, count, examples}], histogram {edges, counts},
    nearest [[id, cos]]."""
    example = {"act": 0.5, "row": 9, "pos": 1, "tokens": ["a", "b"], "acts": [0.5, 0.0], "center": 0}
    extra = {
        "histogram": {"edges": [0.0, 1.0, 2.0], "counts": [5, 2]},
        "nearest": [[4, 0.61], [9, 0.42]],
        "intervals": [
            {"lo": 0.0, "hi": 1.0, "count": 6, "examples": [example]},
            {"lo": 1.0, "hi": 2.0, "count": 2, "examples": []},
        ],
    }
    _features_json(tmp_path / "run", extra)
    out = json.loads(to_neuronpedia(tmp_path / "run", tmp_path / "np.json", "my-model", "res").read_text())
    feature = out["features"][0]
    assert feature["freq_hist_data_bar_values"] == [0.5, 1.5]
    assert feature["freq_hist_data_bar_heights"] == [5, 2]
    assert feature["topkCosSimIndices"] == [4, 9] and feature["topkCosSimValues"] == [0.61, 0.42]
    top, interval = out["activations"]
    assert (interval["binMin"], interval["binMax"], interval["binContains"]) == (0.0, 1.0, 0.75)
    assert interval["id"] != top["id"] and out["layer"] == "15-res" and out["modelId"] == "my-model"


def test_neuronpedia_export_warns_about_a_shape_it_does_not_know(tmp_path):
    _features_json(tmp_path / "run", {"histogram": "not a histogram"})
    with pytest.warns(UserWarning, match="histogram"):
        to_neuronpedia(tmp_path / "run", tmp_path / "np.json")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["saelens", "no/such/run", "out"],
            ["'no/such/run'", "does not exist", "sae.safetensors", "cfg.json"],
        ),
        (["neuronpedia", "no/such/run", "out.json"], ["no/such/run/analysis/features.json", "analyze.py"]),
    ],
)
def test_cli_errors_name_the_path_and_what_is_expected(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_cli_points_from_a_multi_sae_run_to_its_subdirectories(tmp_path, capsys):
    _saved(tmp_path / "runs", "topk")
    with pytest.raises(SystemExit):
        main(["saelens", str(tmp_path / "runs"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "several SAEs" in err and "['topk']" in err


def test_cli_writes_both_formats(tmp_path, capsys):
    _, run = _saved(tmp_path, "jumprelu")
    _features_json(run)
    main(["saelens", str(run), str(tmp_path / "sl")])
    main(["neuronpedia", str(run), str(tmp_path / "np.json")])
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "sl" / "cfg.json").is_file() and json.loads((tmp_path / "np.json").read_text())[
        "features"
    ]


# --- W&B artifacts -----------------------------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with its staging and cache directories inside tmp_path."""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb


def test_log_artifacts_logs_the_sae_and_the_dashboard(tmp_path, wandb_offline):
    _, run_dir = _saved(tmp_path, "topk")
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "dashboard").mkdir()
    (run_dir / "dashboard" / "index.html").write_text("<html>")
    _features_json(run_dir)
    run = wandb_offline.init(mode="offline", project="sae", name="tiny", dir=str(tmp_path))
    logged = []
    log_artifact = run.log_artifact
    run.log_artifact = lambda artifact: logged.append(artifact) or log_artifact(artifact)
    tracking.log_artifacts(run, run_dir)
    run.finish()
    wandb_offline.teardown()  # finish() may return before W&B's service has written the run's record
    assert [(a.name, a.type) for a in logged] == [("tiny-sae", "model"), ("tiny-dashboard", "dashboard")]
    assert sorted(logged[0].manifest.entries) == ["cfg.json", "metrics.json", "sae.safetensors"]
    assert sorted(logged[1].manifest.entries) == ["analysis/features.json", "dashboard/index.html"]
    # The offline run records both manifests for `wandb sync`.
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"tiny-sae" in data and b"sae.safetensors" in data and b"analysis/features.json" in data


def test_training_logs_the_run_directory_as_artifacts(tmp_path, corpus, wandb_offline, monkeypatch):
    calls = []
    log_artifacts = tracking.log_artifacts

    def spy(run, run_dir):
        calls.append(sorted(p.name for p in Path(run_dir).iterdir()))
        return log_artifacts(run, run_dir)

    monkeypatch.setattr(tracking, "log_artifacts", spy)
    from sae.pipeline import run_training

    job = TrainJob(
        model=ModelConfig(name="tiny", dtype="float32", layer=1, batch_size=4),
        data=DataConfig(path=str(corpus), context_size=64),
        sae=SAEConfig(k=8, expansion_factor=2),
        train=TrainConfig(tokens=1024, harvest_tokens=1024, batch_size=256, eval_every=0),
        wandb=WandbConfig(mode="offline"),
        run_dir=str(tmp_path / "run"),
        do_analyze=False,
    )
    job.eval.tokens, job.eval.loss_contexts, job.eval.train_loss_contexts = 512, 0, 0
    run_training(job)
    (files,) = calls
    assert {"sae.safetensors", "cfg.json", "metrics.json", "run.json"} <= set(files)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


# --- analysing a SAELens SAE -------------------------------------------------------------------------------


def test_analyze_runs_on_a_saelens_sae(tmp_path, corpus):
    from sae.pipeline import run_analysis

    sae = _sae("jumprelu", d_in=64, d_sae=128)  # the tiny model is 64 wide
    sae.save(tmp_path / "ours", extra={"model": "tiny", "hook": "model.layers.2", "context_size": 64})
    saelens_dir = to_saelens(tmp_path / "ours", tmp_path / "saelens")
    model = ModelConfig(name="tiny", dtype="float32", batch_size=4, device="cpu")
    job = AnalyzeJob(
        run_dir=str(tmp_path / "analysis"),
        sae_dir=str(saelens_dir),
        model=model,
        data_path=str(corpus),
        analyze=AnalyzeConfig(tokens=512, top_k=3),
    )
    assert run_analysis(job).exists()  # the dashboard
    analysis = json.loads((tmp_path / "analysis" / "analysis" / "features.json").read_text())
    assert (
        analysis["hook"] == "model.layers.2"
        and analysis["arch"] == "jumprelu"
        and len(analysis["features"]) == 128
    )

    cfg = json.loads((saelens_dir / "cfg.json").read_text())
    cfg["metadata"] |= {"hook_name": "blocks.0.hook_resid_pre", "hf_hook_name": None}
    (saelens_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pre"):
        run_analysis(job)
    job.model = ModelConfig(name="tiny", dtype="float32", device="cpu", module="model.layers.1.mlp.gate_proj")
    with pytest.raises(ValueError, match=r"d_in=64.*width 128.*'tiny'"):  # model.module overrides the hook
        run_analysis(job)


def test_analyze_cli_takes_a_saelens_directory():
    from hydra import compose, initialize_config_dir

    from sae.config import register_configs, to_dataclass

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            "analyze", overrides=["run_dir=out", "sae_dir=sl", "model.name=gpt2", "model.dtype=float32"]
        )
    job = to_dataclass(cfg, AnalyzeJob)
    assert (job.sae_dir, job.model.name, job.model.dtype, job.model.module) == ("sl", "gpt2", "float32", None)


# --- with SAELens installed --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_our_export_and_matches_it(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae, run = _saved(tmp_path, arch)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"\s*This SAE has non-empty model_from_pretrained_kwargs", UserWarning
        )
        theirs = sae_lens.SAE.load_from_disk(to_saelens(run, tmp_path / "saelens"))
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = _x()
    with torch.no_grad():
        z = theirs.encode(x)
        assert torch.equal(z, sae.dense(sae.encode(x)))
        torch.testing.assert_close(theirs.decode(z), sae(x).x_hat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "options"),
    [("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {}), ("standard", {})],
)
def test_we_import_what_saelens_saves(tmp_path, arch, options):
    sae_lens = pytest.importorskip("sae_lens")
    cls, cfg_cls = sae_lens.registry.get_sae_class(arch)
    metadata = sae_lens.saes.sae.SAEMetadata(model_name="gpt2-small", hook_name="blocks.3.hook_resid_post")
    theirs = cls(cfg_cls(d_in=D, d_sae=F, apply_b_dec_to_input=False, metadata=metadata, **options))
    with torch.no_grad():
        for name, value in _saelens_tensors(arch, torch.Generator().manual_seed(3)).items():
            getattr(theirs, name).copy_(value)
    theirs.save_model(tmp_path / "sl")
    ours, meta = from_saelens(tmp_path / "sl")
    x = _x()
    with torch.no_grad():
        z = theirs.encode(x)
        torch.testing.assert_close(ours.dense(ours.encode(x)), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(z), atol=1e-4, rtol=1e-4)
    assert meta["model_name"] == "gpt2-small" and module_for_hook(meta["hook_name"]) == "resid.3"
