"""Text source -> packed token ids with provenance.

Rows come from `datasets` in streaming mode: a hub dataset id, a local dataset directory, local files
(.txt/.jsonl/.json/.parquet/.csv), or `wikipedia-sample`, a real sample of ~100 English Wikipedia articles
shipped in gensim's test data, cleaned of markup once and cached as JSON lines.

Packing: each row's tokens are followed by an EOS separator and the stream is cut into contexts of T tokens,
each starting with BOS (so the first position, which models use as an attention sink, is always a special
token). Every token carries its provenance: the dataset row it came from and its position in that row's
tokens; inserted special tokens carry row = pos = -1 and, like any special token, are masked out of
training and analysis.
"""

import bz2
import glob
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sae import hub
from sae.config import DataConfig
from sae.files import write_text

WIKIPEDIA_SAMPLE = "wikipedia-sample"
_GENSIM_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def cache_dir() -> Path:
    """Where converted models and corpora are kept (`$SAE_CACHE`, default ~/.cache/sae)."""
    return Path(os.environ.get("SAE_CACHE", Path.home() / ".cache" / "sae"))


# --- the offline corpus ---------------------------------------------------------------------------------


def _clean_wikitext(text: str) -> str:
    """Turns gensim's markup-stripped wikitext into prose: no bold/italic quotes, headings as plain lines."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^\s*=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses whose (non-Latin) content the parser dropped
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia_sample() -> Path:
    """Path of the cleaned Wikipedia sample as JSON lines ({"title", "text"}), built on first use."""
    out = cache_dir() / "corpora" / "enwiki-sample.jsonl"
    if out.exists():
        return out
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "data.path=wikipedia-sample needs the `gensim` package, which ships the Wikipedia sample: "
            "pip install gensim"
        )
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    source = Path(spec.origin).parent / _GENSIM_FILE
    lines = []
    with bz2.open(source) as f:
        for title, markup, _ in extract_pages(f):
            text = _clean_wikitext(filter_wiki(markup))
            if len(text) > 200 and not text.upper().startswith("#REDIRECT"):
                lines.append(json.dumps({"title": title, "text": text}, ensure_ascii=False))
    write_text(out, "\n".join(lines) + "\n")
    return out


# --- rows -----------------------------------------------------------------------------------------------


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return []  # a dataset directory: loaded like a hub repository
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path] * os.path.isfile(path)
    return files


def load_rows(cfg: DataConfig):
    """An iterable of row dicts for `cfg` (a `datasets` IterableDataset when streaming).

    Fails at once, before any long work, on a missing file, an unknown format, or a dataset without the
    text column.
    """
    import datasets

    path = str(wikipedia_sample()) if cfg.path == WIKIPEDIA_SAMPLE else os.path.expanduser(cfg.path)
    files = _local_files(path)
    # `org/name` is a hub id; a path that starts like a path, names a file type or has a glob is local.
    looks_local = (
        path.startswith((".", "/", "~")) or Path(path).suffix in _BUILDERS or any(c in path for c in "*?[")
    )
    if files:
        suffixes = {Path(f).suffix for f in files}
        unknown = suffixes - set(_BUILDERS)
        if unknown or len(suffixes) > 1:
            raise ValueError(
                f"data.path={cfg.path!r}: cannot read files ending {sorted(suffixes)}; "
                f"accepted: one of {sorted(_BUILDERS)}"
            )
        builder = _BUILDERS[suffixes.pop()]
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise ValueError(
                f"data.path={cfg.path!r}: {empty[:3]} {'is' if len(empty) == 1 else 'are'} empty "
                f"(0 bytes); give files holding text rows"
            )
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(
                builder, data_files=files, split="train", streaming=cfg.streaming, **kwargs
            )
        except (StopIteration, ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            # (StopIteration: `datasets` found no rows to infer a schema from; caught here, as it would
            # otherwise surface from the calling generator as a bare RuntimeError.)
            raise ValueError(
                f"data.path={cfg.path!r}: cannot read {files[:3]} as {builder} rows, is a file truncated, "
                f"corrupt or not {builder}? ({type(err).__name__}: {err})"
            ) from None
    elif os.path.isdir(path) or not looks_local:
        why = hub.unreachable() if not os.path.isdir(path) and not hub.offline() else None
        if why is not None:
            local = f"give local files (data=files data.path=...) or data.path={WIKIPEDIA_SAMPLE}"
            raise hub.error("data.path", cfg.path, why, local)
        try:
            ds = datasets.load_dataset(path, cfg.name, split=cfg.split, streaming=cfg.streaming)
        except datasets.data_files.EmptyDatasetError:
            raise FileNotFoundError(
                f"data.path={cfg.path!r} is a directory holding no data files; accepted: a dataset directory "
                f"with files ending one of {sorted(_BUILDERS)}, a file, a glob, a hub dataset id, or "
                f"{WIKIPEDIA_SAMPLE!r}"
            ) from None
    else:
        raise FileNotFoundError(
            f"data.path={cfg.path!r}: no such file or directory{' (a broken symbolic link)' * os.path.islink(path)}; give an existing file, glob or directory, "
            f"a hub dataset id, or {WIKIPEDIA_SAMPLE!r}"
        )
    columns = ds.column_names
    if columns is not None and cfg.text_column not in columns:
        raise ValueError(
            f"data.text_column={cfg.text_column!r} is not a column of {cfg.path!r}; columns: {columns}"
        )
    return ds


# --- tokens ---------------------------------------------------------------------------------------------


def special_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS/PAD/...): never trained on, never analysed."""
    return sorted(set(tokenizer.all_special_ids))


def bos_eos(tokenizer) -> tuple[int, int]:
    """(BOS, EOS) ids used to start contexts and separate rows; a tokenizer with only one uses it for both."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token to pack with"
        )
    return bos, eos


@dataclass
class Contexts:
    """A batch of packed contexts; every field is [N, T]."""

    ids: torch.Tensor
    """Token ids."""
    row: torch.Tensor
    """Dataset row of each token; -1 for inserted BOS/EOS."""
    pos: torch.Tensor
    """Position of each token among its row's tokens; -1 for inserted BOS/EOS."""
    mask: torch.Tensor
    """True where the token is real text (not a special token): the positions to train on and analyse."""


def _read(rows, cfg: DataConfig) -> Iterator[dict]:
    """`rows`, with a read error met mid-stream (a truncated or corrupt file) naming `data.path`."""
    it = iter(rows)
    while True:
        try:
            r = next(it)
        except StopIteration:
            return
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(
                f"data.path={cfg.path!r}: cannot read its rows, is a file truncated or corrupt? "
                f"({type(err).__name__}: {err})"
            ) from None
        yield r


def _not_text(cfg: DataConfig, i: int, text: object) -> TypeError:
    return TypeError(
        f"data.text_column={cfg.text_column!r} holds {type(text).__name__} values (row {i}: {text!r:.60}), "
        "not text; set data.bad_rows=skip to leave such rows out"
    )


def is_local(cfg: DataConfig) -> bool:
    """Whether `cfg.path` names local files (or the offline corpus), which can be read whole up front."""
    path = os.path.expanduser(cfg.path)
    return cfg.path == WIKIPEDIA_SAMPLE or bool(_local_files(path))


def check_rows(cfg: DataConfig, rows=None) -> dict[str, int]:
    """Reads every row of the corpus once (before any long work) and counts them: `rows`, `held_out` (held-out
    rows with text), `skipped` (rows whose text is not a string, with `data.bad_rows=skip`). A text that is
    not a string raises, naming its row, unless `data.bad_rows=skip`."""
    rows = load_rows(cfg) if rows is None else rows
    counts = {"rows": 0, "held_out": 0, "skipped": 0}
    n = cfg.holdout_every
    for i, r in enumerate(_read(rows, cfg)):
        counts["rows"] += 1
        text = r.get(cfg.text_column)
        if not isinstance(text, str):
            if cfg.bad_rows != "skip":
                raise _not_text(cfg, i, text)
            counts["skipped"] += 1
        elif i % n == n - 1 and text.strip():
            counts["held_out"] += 1
    return counts


def packed_contexts(cfg: DataConfig, tokenizer, split: str, batch_size: int, rows=None) -> Iterator[Contexts]:
    """Yields batches of `batch_size` packed contexts from the `split` ('train' or 'test') rows.

    `rows` overrides `load_rows(cfg)` (tests pass lists of dicts). The last partial batch is dropped so
    every batch has the same shape; a corpus too small for one batch raises ValueError.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; accepted: 'train' or 'test'")
    rows = load_rows(cfg) if rows is None else rows
    bos, eos = bos_eos(tokenizer)
    special = torch.tensor(special_ids(tokenizer))
    T, n = cfg.context_size, cfg.holdout_every
    want_test = split == "test"
    ids: list[int] = []
    row: list[int] = []
    pos: list[int] = []
    batch: list[tuple[list[int], list[int], list[int]]] = []
    n_rows = n_text = n_batches = 0

    def texts() -> Iterator[tuple[int, str]]:
        nonlocal n_rows, n_text
        for i, r in enumerate(_read(rows, cfg)):
            n_rows += 1
            if ((i % n) == n - 1) != want_test:
                continue
            if cfg.text_column not in r:
                raise ValueError(
                    f"data.text_column={cfg.text_column!r} is not a column of {cfg.path!r}; columns: {sorted(r)}"
                )
            text = r[cfg.text_column]
            if not isinstance(text, str):
                if cfg.bad_rows == "skip":
                    continue
                raise _not_text(cfg, i, text)
            if text.strip():
                n_text += 1
                yield i, text

    for i, text in texts():
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
        ids += tokens
        row += [i] * (len(tokens) - 1) + [-1]
        pos += list(range(len(tokens) - 1)) + [-1]
        while len(ids) >= T - 1:
            batch.append(([bos] + ids[: T - 1], [-1] + row[: T - 1], [-1] + pos[: T - 1]))
            del ids[: T - 1], row[: T - 1], pos[: T - 1]
            if len(batch) == batch_size:
                out = [torch.tensor([b[j] for b in batch]) for j in range(3)]
                mask = (out[1] >= 0) & ~torch.isin(out[0], special)
                yield Contexts(ids=out[0], row=out[1], pos=out[2], mask=mask)
                batch, n_batches = [], n_batches + 1
    if n_batches == 0:
        raise ValueError(
            f"data.path={cfg.path!r} gave fewer than one batch of {batch_size} contexts x {T} tokens for the "
            f"{split!r} split ({n_rows} rows read, {n_text} of them with text); use more text or a smaller batch/context size"
        )


def check_held_out(cfg: DataConfig, tokenizer, batch_size: int) -> None:
    """Raises, before any long work, if a row's text is not a string (`data.bad_rows=error`; local corpora are
    read whole for it) or the held-out rows give no batch of contexts for evaluation and analysis."""
    counts = check_rows(cfg) if is_local(cfg) else None
    if counts and counts["skipped"]:
        print(f"data.path={cfg.path!r}: {counts['skipped']} rows whose text is not a string are left out")
    try:
        next(packed_contexts(cfg, tokenizer, "test", batch_size))
    except ValueError as err:
        if "fewer than one batch" not in str(err):
            raise
        n = cfg.holdout_every
        found = (
            f"{counts['rows']} rows, of which {counts['held_out']} held out with text"
            if counts is not None
            else "too few held-out rows"
        )
        raise ValueError(
            f"data.path={cfg.path!r} has {found} (every data.holdout_every={n}-th row, rows {n - 1}, "
            f"{2 * n - 1}, ...): evaluation and analysis need at least one batch of model.batch_size="
            f"{batch_size} contexts of data.context_size={cfg.context_size} tokens of held-out "
            "text. Lower data.holdout_every or model.batch_size, split the text into more rows (a blank line "
            "separates the rows of a .txt file), or add text"
        ) from None
