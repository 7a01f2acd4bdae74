"""Our SAEs and their analysis in other tools' formats.

    python -m sae.formats saelens runs/demo exports/demo-saelens       # SAELens: cfg.json + sae_weights.safetensors
    python -m sae.formats neuronpedia runs/demo exports/demo-np.json   # Neuronpedia: feature and activation rows
    python analyze.py run_dir=runs/gpt2-l8 sae_dir=path/to/saelens/sae model.name=gpt2   # analyse a SAELens SAE

**SAELens 6.x** (`sae_lens.SAE.load_from_disk(dir)`). The layout was read from the source of sae-lens 6.54.12:
`saes/sae.py` (SAEConfig, load_from_disk), `saes/{topk,jumprelu,standard,batchtopk}_sae.py` and
`loading/pretrained_sae_loaders.py` (sae_lens_disk_loader, handle_config_defaulting, LLM_METADATA_KEYS);
https://github.com/jbloomAus/SAELens/tree/main/sae_lens. The weights have our names and orientation
(W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]). Architectures map as

| ours                    | SAELens    | why the code is the same                                                 |
|-------------------------|------------|--------------------------------------------------------------------------|
| topk                    | `topk`     | ReLU then top-k (ours) and top-k then ReLU (SAELens) keep the same values |
| jumprelu                | `jumprelu` | ReLU(h) * (ReLU(h) > t) == ReLU(h) * (h > t) for every t                   |
| relu                    | `standard` | ReLU(h)                                                                  |
| batchtopk, matryoshka   | `jumprelu` | inference is ReLU(h) * (ReLU(h) > t) with one t: every threshold set to t, |
|                         |            | as SAELens saves its own BatchTopK SAEs (batchtopk_sae.py)               |

with h = (x - b_dec) @ W_enc + b_enc. Our saved weights take raw activations (the input scale is folded in), so
`normalize_activations` is `none`. A block's output, our `model.layers.L` (`resid.L`), is TransformerLens'
`blocks.L.hook_resid_post`; the module path is kept in `metadata.hf_hook_name`, SAELens' own key for it.

Importing (`from_saelens`) takes `topk`, `jumprelu` and `standard` SAEs and folds what SAELens does at run time
into the weights, exactly: `apply_b_dec_to_input: false` into b_enc, and TopK's `rescale_acts_by_decoder_norm`
into unit-norm decoder rows (the codes equal SAELens' feature activations). Non-unit decoder rows of the other
architectures need nothing: SAELens' inference does not use their norms. Run-time input normalisation
(`normalize_activations` other than `none`) and attention-head reshaping are refused.

**Neuronpedia**: the rows of its dataset exports, one JSON file with the `features` (table `Neuron`) and
`activations` (table `Activation`) of one source. Columns as in Neuronpedia's Prisma schema
(https://github.com/hijohnnylin/neuronpedia/blob/main/apps/webapp/prisma/schema.prisma, models Neuron and
Activation) and its exporter (utils/neuronpedia-utils/neuronpedia_utils/export-data.py, which writes these rows
as `features/batch-N.jsonl` and `activations/batch-N.jsonl`); the top-activation bin convention (binMin -1,
binMax the feature's max) is SAEDashboard's (https://github.com/jbloomAus/SAEDashboard,
sae_dashboard/neuronpedia/neuronpedia_converter.py). `jq -c '.features[]'` gives a batch file.
"""

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae.files import save_tensors, write_json, write_text
from sae.model import SAE, read_config
from sae.rundir import open_run, read_job

SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
SAELENS_SPARSITY = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as `metadata.sae_lens_version`: the 6.x layout (older versions make SAELens convert the config)."""
_TO_SAELENS = {
    "topk": "topk",
    "jumprelu": "jumprelu",
    "relu": "standard",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}
_LEGACY_META = (
    "model_name",
    "hook_name",
    "hook_point",
    "hook_head_index",
    "context_size",
    "dataset_path",
    "hf_hook_name",
)
"""Metadata keys at the top level of a SAELens cfg.json older than 6.x."""
_FROM_SAELENS = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}
_BLOCK = re.compile(r"^(?:.+\.)?(?:layers|h|blocks)\.(\d+)$")  # model.layers.L, transformer.h.L, ...
_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def saelens_hook(module: str | None) -> str | None:
    """TransformerLens' name for our module path: a block's output (`model.layers.L`, `resid.L`) is
    `blocks.L.hook_resid_post`; any other module keeps its path."""
    if module is None:
        return None
    match = _BLOCK.match(module) or re.match(r"^resid\.(\d+)$", module)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else module


def module_for_hook(hook_name: str | None, hf_hook_name: str | None = None) -> str:
    """Our module for a SAELens hook: `blocks.L.hook_resid_post` is `resid.L`, `blocks.L.hook_resid_pre` is
    `resid.{L-1}`; otherwise the config's `hf_hook_name` (a module path), if it has one."""
    match = _RESID.match(hook_name or "")
    if match:
        layer, where = int(match.group(1)), match.group(2)
        if where == "post":
            return f"resid.{layer}"
        if layer > 0:
            return f"resid.{layer - 1}"
        raise ValueError(
            f"SAELens hook {hook_name!r} reads the embeddings, not a block's output, so no resid.L alias reaches "
            "it; name the module whose output it is with model.module=..."
        )
    if hf_hook_name:
        return hf_hook_name
    raise ValueError(
        f"SAELens hook {hook_name!r} has no module here: accepted are blocks.L.hook_resid_post (-> resid.L) and "
        "blocks.L.hook_resid_pre for L >= 1 (-> resid.{L-1}), or a metadata.hf_hook_name in its cfg.json; "
        "or name the module with model.module=..."
    )


# --- SAELens ---------------------------------------------------------------------------------------------


def to_saelens(
    run_dir: str | Path, out_dir: str | Path, model: str | None = None, hook: str | None = None
) -> Path:
    """Writes the SAE of `run_dir` in SAELens 6.x's layout into `out_dir`: `sae_weights.safetensors`, `cfg.json`
    and, where the run was analysed, `sparsity.safetensors` (log10 feature density). `model` and `hook` fill in
    what the run's cfg.json lacks (an SAE saved outside train.py)."""
    run = open_run(run_dir, model=False)
    run_dir, out, sae, cfg = run.dir, Path(out_dir), run.sae, read_config(run.dir)
    module = cfg.get("hook") or hook
    context_size = cfg.get("context_size") or (run.job.data.context_size if run.job else None)
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": cfg.get("model") or model,
        "hook_name": saelens_hook(module),
        "hf_hook_name": module,
        "context_size": context_size,
        "prepend_bos": True,  # every context starts with BOS (sae/data.py)
        "exclude_special_tokens": True,  # BOS/EOS/PAD positions are never trained on
        "dataset_path": cfg.get("data") or (run.job.data.path if run.job else None),
        # Our SAEs read the HF model's raw residual stream. TransformerLens centres it by default for LayerNorm
        # models (center_writing_weights); SAELens' own runner sets the same for HookedTransformer.
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
        "training_architecture": sae.arch,
    }
    arch = _TO_SAELENS[sae.arch]
    saelens_cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        saelens_cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    else:
        metadata["training_k"] = sae.k if sae.arch in ("batchtopk", "matryoshka") else None
    if sae.arch == "matryoshka":
        metadata["matryoshka_prefixes"] = list(sae.prefixes)
    saelens_cfg["metadata"] = metadata

    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold.expand(sae.d_sae)  # one scalar for batchtopk and matryoshka
    save_tensors(out / SAELENS_WEIGHTS, {k: v.float() for k, v in tensors.items()})
    stats = run_dir / "analysis" / "features.safetensors"
    if stats.is_file():
        density = load_file(str(stats))["density"]  # [F]
        save_tensors(out / SAELENS_SPARSITY, {"sparsity": torch.log10(density + 1e-10)})
    write_json(out / SAELENS_CONFIG, saelens_cfg)  # last: a directory with cfg.json is complete
    return out


def _saelens_config(path: Path) -> tuple[dict, dict]:
    """(config, metadata) of a SAELens cfg.json, 6.x or older (whose metadata keys sit at the top level)."""
    cfg = json.loads((path / SAELENS_CONFIG).read_text())
    meta = {k: cfg[k] for k in _LEGACY_META if k in cfg}
    meta.setdefault("hook_name", meta.pop("hook_point", None))
    meta |= cfg.get("metadata") or {}
    if "architecture" not in cfg:  # before 6.0: the activation function named the architecture
        fn = cfg.get("activation_fn") or cfg.get("activation_fn_str")
        cfg["architecture"] = "topk" if fn == "topk" else "standard"
        cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    return cfg, meta


def from_saelens(path: str | Path) -> tuple[SAE, dict]:
    """Imports a SAELens SAE directory (cfg.json + sae_weights.safetensors; `topk`, `jumprelu` or `standard`)
    as our SAE, with the same codes and reconstructions. Returns (sae, meta): meta holds `model_name`,
    `hook_name`, `hf_hook_name`, `context_size`, `dataset_path` and `architecture` from its cfg.json."""
    path = Path(path)
    for name in (SAELENS_CONFIG, SAELENS_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{str(path / name)!r} does not exist: a SAELens SAE directory holds {SAELENS_CONFIG} and "
                f"{SAELENS_WEIGHTS} (what SAELens' save_model and `python -m sae.formats saelens` write)"
            )
    cfg, meta = _saelens_config(path)
    arch, where = cfg["architecture"], path / SAELENS_CONFIG
    if arch not in _FROM_SAELENS:
        raise ValueError(
            f"{where}: SAELens architecture {arch!r} cannot be imported; accepted: {sorted(_FROM_SAELENS)} "
            "(SAELens saves its BatchTopK SAEs as jumprelu)"
        )
    norm = cfg.get("normalize_activations") or "none"
    norm = "expected_average_only_in" if norm is True else norm
    if norm != "none":
        raise ValueError(
            f"{where}: normalize_activations={norm!r} rescales inputs at run time by a factor the weights do not "
            "hold; accepted: 'none' (in SAELens, fold it first: sae.fold_activation_norm_scaling_factor(s))"
        )
    if (cfg.get("reshape_activations") or "none") != "none" or meta.get("hook_head_index") is not None:
        raise ValueError(
            f"{where}: SAEs of attention heads (hook_z reshaping, hook_head_index) are not supported"
        )

    t = {k: v.double() for k, v in load_file(str(path / SAELENS_WEIGHTS)).items()}
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in t and not torch.all(t.pop(key) == 1):
            raise ValueError(f"{where}: a {key} other than 1 (a fine-tuned output scale) is not supported")
    if "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").exp()
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if set(t) != expected:
        raise ValueError(
            f"{path / SAELENS_WEIGHTS} holds tensors {sorted(t)}; a SAELens {arch} SAE holds {sorted(expected)}"
        )
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    for key, value in t.items():
        if tuple(value.shape) != shapes[key]:
            raise ValueError(f"{where}: {key} has shape {list(value.shape)}, expected {list(shapes[key])}")

    W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + t["b_dec"] @ W_enc  # h = x @ W_enc + b_enc = (x - b_dec) @ W_enc + b_enc'
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks h * ||W_dec_i|| and decodes z / ||W_dec_i|| @ W_dec: the same as encoder columns and
        # b_enc scaled by the norms and unit decoder rows (ReLU and top-k commute with a positive scale).
        norms = W_dec.norm(dim=1)  # [F]
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    k = int(cfg.get("k") or 100) if arch == "topk" else min(32, d_sae - 1)  # 100: SAELens' TopK default
    sae = SAE(d_in, d_sae, k, arch=_FROM_SAELENS[arch])
    state = {"encoder": W_enc.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": t["b_dec"]}
    if arch == "jumprelu":
        state["threshold"] = t["threshold"]
    sae.load_state_dict({key: value.float().contiguous() for key, value in state.items()})
    keys = ("model_name", "hook_name", "hf_hook_name", "context_size", "dataset_path")
    return sae, {key: meta.get(key) for key in keys} | {"architecture": arch, "source": str(path)}


# --- Neuronpedia -----------------------------------------------------------------------------------------


def _get(d: dict, *keys: str) -> Any:
    return next((d[k] for k in keys if k in d), None)


def _histogram(h: Any) -> tuple[list[float], list[float]] | None:
    """(bar values, bar heights) of a features.json histogram: {edges [B+1], counts [B]} (values: bin centres)
    or {values|centers [B], counts|heights [B]}; None for another shape."""
    if not isinstance(h, dict):
        return None
    counts = _get(h, "counts", "heights", "bar_heights")
    edges, values = _get(h, "edges", "bin_edges"), _get(h, "values", "centers", "bar_values")
    if counts is not None and edges is not None and len(edges) == len(counts) + 1:
        values = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    if counts is None or values is None or len(values) != len(counts):
        return None
    return [round(v, 4) for v in values], [float(c) for c in counts]


def _neighbours(nearest: Any) -> tuple[list[int], list[float]] | None:
    """(indices, cosines) of features.json's decoder neighbours: [[id, cos], ...], [{id, cos}, ...] or
    {ids, cos}; None for another shape."""
    if isinstance(nearest, dict):
        ids, cos = _get(nearest, "ids", "indices", "id"), _get(nearest, "cos", "values", "sims", "similarity")
        pairs = list(zip(ids, cos)) if ids is not None and cos is not None else None
    elif isinstance(nearest, list) and all(isinstance(n, list | tuple) and len(n) == 2 for n in nearest):
        pairs = [tuple(n) for n in nearest]
    elif isinstance(nearest, list) and all(isinstance(n, dict) for n in nearest):
        pairs = [(_get(n, "id", "index"), _get(n, "cos", "value", "sim", "similarity")) for n in nearest]
    else:
        pairs = None
    if pairs is None or any(i is None or c is None for i, c in pairs):
        return None
    return [int(i) for i, _ in pairs], [round(float(c), 4) for _, c in pairs]


def _activation(example: dict, key: dict, j: int, data: str | None, bin_: tuple) -> dict:
    """One Neuronpedia `Activation` row of an example {act, row, pos, tokens, acts, center}."""
    values = [float(v) for v in example["acts"]]
    top = max(range(len(values)), key=values.__getitem__)
    return key | {
        "id": f"{key['modelId']}@{key['layer']}:{key['index']}:{j}",
        "dataSource": data,
        "dataIndex": str(example.get("row")),
        "tokens": list(example["tokens"]),
        "values": values,
        "maxValue": values[top],
        "maxValueTokenIndex": top,
        "minValue": min(values),
        "qualifyingTokenIndex": example["center"],  # the token that made it an example
        "dfaValues": [],
        "dfaMaxValue": None,
        "dfaTargetIndex": None,
        "binMin": bin_[0],
        "binMax": bin_[1],
        "binContains": bin_[2],
    }


def to_neuronpedia(
    run_dir: str | Path, out_path: str | Path, model_id: str | None = None, source_set: str | None = None
) -> Path:
    """Writes `run_dir/analysis/features.json` as Neuronpedia export rows to `out_path` (JSON):
    {modelId, layer, sourceSetName, hookName, n_tokens, features: [Neuron rows], activations: [Activation
    rows]}. `model_id` (default: the model's name) and `source_set` (default `sae-<arch>`) name the source;
    Neuronpedia's source id, which its rows call `layer`, is `<block>-<source_set>`."""
    run_dir = Path(run_dir)
    path = run_dir / "analysis" / "features.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: expected an analysed run directory; "
            f"run `python analyze.py run_dir={run_dir}` first"
        )
    analysis = json.loads(path.read_text(encoding="utf-8"))
    hook = analysis.get("hook")
    model_id = model_id or re.sub(
        r"[^a-z0-9_-]+", "-", Path(str(analysis.get("model") or "model")).name.lower()
    )
    source_set = source_set or f"sae-{analysis.get('arch', 'sae')}"
    block = re.search(r"(\d+)", hook or "")
    source = f"{block.group(1)}-{source_set}" if block else source_set
    job = read_job(run_dir)
    data = job.data.path if job else None
    unknown: set[str] = set()
    features, activations = [], []
    for f in analysis["features"]:
        key = {"modelId": model_id, "layer": source, "index": str(f["id"])}
        top, bottom = f.get("top_logits") or [], f.get("bottom_logits") or []
        hist = _histogram(f.get("histogram")) if "histogram" in f else None
        near = _neighbours(f.get("nearest")) if "nearest" in f else None
        unknown |= {k for k, ok in (("histogram", hist), ("nearest", near)) if k in f and ok is None}
        features.append(
            key
            | {
                "sourceSetName": source_set,
                "hookName": saelens_hook(hook),
                "maxActApprox": f["max_act"],
                "frac_nonzero": f["density"],
                "pos_str": [t for t, _ in top],
                "pos_values": [v for _, v in top],
                "neg_str": [t for t, _ in bottom],
                "neg_values": [v for _, v in bottom],
                "freq_hist_data_bar_values": hist[0] if hist else [],
                "freq_hist_data_bar_heights": hist[1] if hist else [],
                "logits_hist_data_bar_values": [],
                "logits_hist_data_bar_heights": [],
                "topkCosSimIndices": near[0] if near else [],
                "topkCosSimValues": near[1] if near else [],
                "neuron_alignment_indices": [],
                "neuron_alignment_values": [],
                "neuron_alignment_l1": [],
                "correlated_neurons_indices": [],
                "correlated_neurons_pearson": [],
                "correlated_neurons_l1": [],
                "correlated_features_indices": [],
                "correlated_features_pearson": [],
                "correlated_features_l1": [],
                "decoder_weights_dist": [],
                "hasVector": False,
                "vector": [],
                "vectorLabel": None,
            }
        )
        j = 0
        for example in f["examples"]:  # SAEDashboard's top-activations bin: min -1, max the feature's max
            activations.append(_activation(example, key, j, data, (-1.0, f["max_act"], -1.0)))
            j += 1
        intervals = f.get("intervals") or []
        total = sum(i.get("count") or 0 for i in intervals if isinstance(i, dict))  # the feature's firings
        for interval in intervals:
            if not isinstance(interval, dict):
                unknown.add("intervals")
                continue
            lo_hi = (_get(interval, "lo", "min", "bin_min"), _get(interval, "hi", "max", "bin_max"))
            if None in lo_hi or "examples" not in interval:
                unknown.add("intervals")
                continue
            contains = _get(interval, "fraction", "contains", "bin_contains")
            if contains is None and total and "count" in interval:  # SAEDashboard's share of the firings
                contains = interval["count"] / total
            for example in interval["examples"]:
                activations.append(_activation(example, key, j, data, (*lo_hi, contains)))
                j += 1
    if unknown:
        warnings.warn(
            f"{path}: left out {sorted(unknown)}, whose shape this exporter does not know", stacklevel=2
        )
    out = {
        "modelId": model_id,
        "layer": source,
        "sourceSetName": source_set,
        "hookName": saelens_hook(hook),
        "n_tokens": analysis.get("n_tokens"),
        "features": features,
        "activations": activations,
    }
    return write_text(out_path, json.dumps(out))


# --- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sae.formats", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    saelens = sub.add_parser("saelens", help="SAELens 6.x: cfg.json + sae_weights.safetensors")
    saelens.add_argument("run_dir", help="a run directory (sae.safetensors + cfg.json)")
    saelens.add_argument("out_dir", help="the directory to write")
    saelens.add_argument("--model", help="model name, where the run's cfg.json has none")
    saelens.add_argument("--hook", help="hooked module (model.layers.15), where the run's cfg.json has none")
    neuronpedia = sub.add_parser("neuronpedia", help="Neuronpedia export rows: features and activations")
    neuronpedia.add_argument("run_dir", help="an analysed run directory (analysis/features.json)")
    neuronpedia.add_argument("out_path", help="the JSON file to write")
    neuronpedia.add_argument("--model-id", help="Neuronpedia model id (default: the model's name)")
    neuronpedia.add_argument("--source-set", help="Neuronpedia source set name (default: sae-<arch>)")
    args = parser.parse_args(argv)
    try:
        if args.format == "saelens":
            out = to_saelens(args.run_dir, args.out_dir, model=args.model, hook=args.hook)
        else:
            out = to_neuronpedia(args.run_dir, args.out_path, args.model_id, args.source_set)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    except OSError as err:  # the output: a file where a directory goes, a read-only file system, a full disk
        target = args.out_dir if args.format == "saelens" else args.out_path
        parser.error(f"cannot write {target!r}: {err.strerror or err} ({err.filename or target})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
