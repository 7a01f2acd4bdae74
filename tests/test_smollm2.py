"""End to end on the real SmolLM2-135M and the real Wikipedia sample, at a small budget (about a minute)."""

import json

import pytest
import torch

from sae import harvest
from sae.config import (
    AnalyzeConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
    TrainJob,
    WandbConfig,
)
from sae.data import packed_contexts
from sae.pipeline import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return harvest.load_model(ModelConfig(dtype="float32"))


def test_capture_matches_hidden_states_and_stops_early(smollm2):
    model, tokenizer = smollm2
    cfg = ModelConfig(layer=15)
    module = harvest.resolve_module(model, cfg)
    assert module == "model.layers.15"
    batch = next(packed_contexts(DataConfig(context_size=32), tokenizer, "test", 2))
    ran = []
    handle = model.model.layers[16].register_forward_pre_hook(lambda *_: ran.append(16))
    try:
        acts = harvest.capture(model, [module], batch.ids)[module]
    finally:
        handle.remove()
    assert not ran
    reference = model(batch.ids, output_hidden_states=True).hidden_states[16]
    torch.testing.assert_close(acts, reference)


def test_pipeline_on_the_real_model(tmp_path):
    job = TrainJob(
        model=ModelConfig(batch_size=16),
        sae=SAEConfig(k=32, expansion_factor=4),
        train=TrainConfig(tokens=60_000, harvest_tokens=30_000, batch_size=512, log_every=10),
        eval=EvalConfig(tokens=4096, loss_contexts=8),
        analyze=AnalyzeConfig(tokens=4096),
        wandb=WandbConfig(mode="disabled"),
        run_dir=str(tmp_path / "run"),
    )
    metrics = run_training(job)
    assert metrics["l0"] == pytest.approx(32, abs=0.01)
    # Far from converged at this budget, yet clearly learned: an untrained SAE's FVU is above 1.
    assert metrics["fvu"] < 0.7
    assert metrics["ce_clean"] < metrics["ce_spliced"] < metrics["ce_zero"]
    assert 0.3 < metrics["loss_recovered"] < 1
    assert metrics["outlier_fraction"] < 0.01
    analysis = json.loads((tmp_path / "run" / "analysis" / "features.json").read_text())
    assert analysis["model"] == "smollm2-135m" and analysis["hook"] == "model.layers.15"
    text = " ".join("".join(ex["tokens"]) for f in analysis["features"][:200] for ex in f["examples"])
    assert sum(word in text for word in (" the ", " of ", " and ", " in ")) >= 3  # real English contexts
    assert (
        len(analysis["features"]) == 4 * 576 and analysis["n_tokens"] >= 4096 - 16 * 2
    )  # bound, less skipped
    site = tmp_path / "run" / "dashboard"
    assert (site / "feature.html").is_file() and len(
        list((site / "data").glob("features-*.js"))
    ) == 4 * 576 // 256
