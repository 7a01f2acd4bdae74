"""Packing with provenance, the train/test split, every corpus source, and errors that name the input."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae.config import DataConfig
from sae.data import Contexts, bos_eos, load_rows, packed_contexts, special_ids, wikipedia_sample

T, N_HOLD = 24, 3


def cfg(path: str = "hand-written.jsonl", **kw) -> DataConfig:
    return DataConfig(path=path, context_size=kw.pop("context_size", T), holdout_every=N_HOLD, **kw)


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack(tokenizer, rows, split="train", batch_size=2, **kw) -> list[Contexts]:
    return list(packed_contexts(cfg(**kw), tokenizer, split, batch_size, rows=rows))


@pytest.fixture
def rows(sentences) -> list[dict]:
    return [{"text": s, "id": i} for i, s in enumerate(sentences)]


def test_special_tokens_of_the_tiny_tokenizer(tokenizer):
    assert bos_eos(tokenizer) == (0, 1)
    assert special_ids(tokenizer) == [0, 1]


@pytest.mark.parametrize("split", ["train", "test"])
def test_contexts_start_with_bos_and_have_context_size_tokens(tokenizer, rows, split):
    batches = pack(tokenizer, rows, split)
    assert batches
    bos, eos = bos_eos(tokenizer)
    for b in batches:
        for t in (b.ids, b.row, b.pos, b.mask):
            assert t.shape == (2, T)
        assert (b.ids[:, 0] == bos).all()
        assert (b.row[:, 0] == -1).all() and (b.pos[:, 0] == -1).all()
        # Mask is False exactly on special tokens; inserted specials carry no provenance.
        special = torch.isin(b.ids, torch.tensor([bos, eos]))
        assert torch.equal(b.mask, ~special)
        assert torch.equal(b.row == -1, special) and torch.equal(b.pos == -1, special)
        assert (b.ids[b.mask] > 1).all()


def test_special_tokens_inside_the_text_are_masked(tokenizer, rows):
    rows = [{"text": r["text"].replace(" the ", " <eos> the <bos> ")} for r in rows]
    batches = pack(tokenizer, rows)
    in_text = torch.cat([(b.row >= 0) & (b.ids <= 1) for b in batches])
    assert in_text.sum() > 5  # the literal specials kept their provenance...
    assert not torch.cat([b.mask for b in batches])[in_text].any()  # ...and are still masked


def test_provenance_points_back_into_the_rows(tokenizer, rows):
    checked = 0
    for b in pack(tokenizer, rows, "train") + pack(tokenizer, rows, "test"):
        for n, t in b.mask.nonzero().tolist():
            r, p = b.row[n, t].item(), b.pos[n, t].item()
            assert b.ids[n, t].item() == tokens(tokenizer, rows[r]["text"])[p]
            checked += 1
    assert checked > 10 * T


def test_packing_keeps_every_token_in_order(tokenizer, rows):
    # The contexts minus their BOS are the train rows' tokens, each row followed by EOS, cut into T - 1.
    batches = pack(tokenizer, rows, "train")
    stream = []
    for i, r in enumerate(rows):
        if i % N_HOLD != N_HOLD - 1:
            stream += tokens(tokenizer, r["text"]) + [1]
    packed = torch.cat([b.ids[:, 1:] for b in batches]).flatten().tolist()
    assert len(packed) == len(batches) * 2 * (T - 1)
    assert packed == stream[: len(packed)]
    assert len(stream) - len(packed) < 2 * (T - 1)  # only the last partial batch is dropped
    # Positions within a row count up from 0, and rows appear in order.
    row = torch.cat([b.row[:, 1:] for b in batches]).flatten()
    pos = torch.cat([b.pos[:, 1:] for b in batches]).flatten()
    real = row >= 0
    assert (row[real].diff() >= 0).all()
    assert pos[real][0] == 0


def test_splits_use_disjoint_rows(tokenizer, rows):
    def used_rows(split):
        return {r for b in pack(tokenizer, rows, split, batch_size=1) for r in b.row[b.mask].tolist()}

    train, test = used_rows("train"), used_rows("test")
    assert train and test and not train & test
    assert all(r % N_HOLD == N_HOLD - 1 for r in test)
    assert all(r % N_HOLD != N_HOLD - 1 for r in train)


def test_blank_rows_are_skipped(tokenizer, rows):
    with_blanks = [r if i % 2 else {"text": "   \n"} for i, r in enumerate(rows)]
    for b in pack(tokenizer, with_blanks):
        assert (b.row[b.mask] % 2 == 1).all()


def test_bad_split_is_rejected(tokenizer, rows):
    with pytest.raises(ValueError, match="'valid'.*'train' or 'test'"):
        pack(tokenizer, rows, "valid")


@pytest.mark.parametrize("few_rows", [[], [{"text": "Hi."}], [{"text": "   "}] * 10])
def test_corpus_smaller_than_one_batch_raises_naming_the_path(tokenizer, few_rows):
    with pytest.raises(ValueError, match=r"hand-written\.jsonl.*fewer than one batch"):
        pack(tokenizer, few_rows, batch_size=4)


def test_large_batch_on_a_small_corpus_raises(tokenizer, rows):
    with pytest.raises(ValueError, match="fewer than one batch of 1000 contexts"):
        pack(tokenizer, rows, batch_size=1000)


def test_missing_text_column_lists_columns(tokenizer):
    bad = [{"body": "Some text here.", "title": "x"}] * 10
    with pytest.raises(ValueError, match=r"text_column='text'.*\['body', 'title'\]"):
        pack(tokenizer, bad)


def test_non_text_column_raises_type_error(tokenizer):
    with pytest.raises(TypeError, match="int"):
        pack(tokenizer, [{"text": 5}] * 10)


def test_other_text_column(tokenizer, sentences):
    rows = [{"body": s} for s in sentences]
    batches = list(packed_contexts(cfg(text_column="body"), tokenizer, "train", 2, rows=rows))
    b = batches[0]
    n, t = b.mask.nonzero()[0].tolist()
    assert b.ids[n, t] == tokens(tokenizer, sentences[b.row[n, t]])[b.pos[n, t]]


# --- load_rows ------------------------------------------------------------------------------------------


def texts_of(ds) -> list[str]:
    return [r["text"] for r in ds]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_load_rows_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_rows(DataConfig(path=str(missing)))


def test_load_rows_missing_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(DataConfig(path=str(tmp_path / "*.jsonl")))


def test_load_jsonl(tmp_path, sentences):
    path = write_jsonl(tmp_path / "c.jsonl", sentences[:5])
    assert texts_of(load_rows(DataConfig(path=str(path)))) == sentences[:5]


def test_load_json_array(tmp_path, sentences):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": s} for s in sentences[:4]]))
    assert texts_of(load_rows(DataConfig(path=str(path)))) == sentences[:4]


def test_load_txt_by_paragraph(tmp_path, sentences):
    paragraphs = [" ".join(sentences[0:2]), sentences[2] + "\n" + sentences[3], sentences[4]]
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    assert [t.strip() for t in texts_of(load_rows(DataConfig(path=str(path))))] == paragraphs


def test_load_parquet(tmp_path, sentences):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": sentences[:6], "n": list(range(6))}), path)
    ds = load_rows(DataConfig(path=str(path)))
    assert texts_of(ds) == sentences[:6]


def test_load_csv_with_commas_in_text(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,n\n"Hello, world.",1\nGood bye.,2\n')
    assert texts_of(load_rows(DataConfig(path=str(path)))) == ["Hello, world.", "Good bye."]


def test_load_csv_with_other_column_name(tmp_path, tokenizer):
    path = tmp_path / "c.csv"
    path.write_text("body,n\n" + "".join(f"Line number {i} of the file.,{i}\n" for i in range(20)))
    rows = load_rows(DataConfig(path=str(path)))
    with pytest.raises(ValueError, match=r"text_column='text'.*'body'"):
        list(packed_contexts(cfg(str(path)), tokenizer, "train", 1, rows=rows))


def test_load_jsonl_without_text_column_fails_at_once(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"text_column='text'.*\['body'\]"):
        load_rows(DataConfig(path=str(path)))


def test_load_dataset_directory_like_a_hub_repository(tmp_path, sentences):
    # A directory takes the hub code path: datasets.load_dataset(path, name, split=..., streaming=True).
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "train.jsonl", sentences[:7])
    write_jsonl(tmp_path / "corpus" / "test.jsonl", sentences[7:9])
    assert texts_of(load_rows(DataConfig(path=str(tmp_path / "corpus")))) == sentences[:7]
    test = load_rows(DataConfig(path=str(tmp_path / "corpus"), split="test"))
    assert texts_of(test) == sentences[7:9]


def test_load_glob_of_two_files(tmp_path, sentences):
    write_jsonl(tmp_path / "part-1.jsonl", sentences[3:6])
    write_jsonl(tmp_path / "part-0.jsonl", sentences[0:3])
    write_jsonl(tmp_path / "other.jsonl", ["not me"])
    ds = load_rows(DataConfig(path=str(tmp_path / "part-*.jsonl")))
    assert texts_of(ds) == sentences[:6]


def test_packed_contexts_from_a_file(tmp_path, tokenizer, sentences):
    path = write_jsonl(tmp_path / "c.jsonl", sentences)
    batches = list(packed_contexts(cfg(str(path)), tokenizer, "train", 2))
    b = batches[-1]
    for n, t in b.mask.nonzero().tolist():
        assert b.ids[n, t] == tokens(tokenizer, sentences[b.row[n, t]])[b.pos[n, t]]


def test_unknown_suffix_names_accepted_ones(tmp_path):
    path = tmp_path / "corpus.xml"
    path.write_text("<text>hello</text>")
    with pytest.raises(ValueError, match=r"\.xml.*accepted.*\.csv.*\.jsonl.*\.parquet.*\.txt"):
        load_rows(DataConfig(path=str(path)))


def test_glob_of_mixed_suffixes_is_rejected(tmp_path, sentences):
    write_jsonl(tmp_path / "a.jsonl", sentences[:2])
    (tmp_path / "b.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"\['\.jsonl', '\.txt'\]"):
        load_rows(DataConfig(path=str(tmp_path / "*")))


# --- the offline corpus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """The Wikipedia sample converted from gensim's file into a fresh cache (not the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAE_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = wikipedia_sample()
        assert path.is_relative_to(tmp_path_factory.getbasetemp())
        assert wikipedia_sample() == path  # cached: the second call finds the file
        yield path, [r["text"] for r in load_rows(DataConfig(path="wikipedia-sample"))]


def test_wikipedia_sample_is_clean_prose(wiki):
    path, texts = wiki
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) > 50
    assert [r["text"] for r in rows] == texts
    assert all(r["title"] and len(r["text"]) > 200 for r in rows)
    for r in rows:
        assert "'''" not in r["text"] and "''" not in r["text"], r["title"]
        assert not r["text"].upper().startswith("#REDIRECT"), r["title"]
        heading = re.search(r"^\s*=+[^=\n]*=+\s*$", r["text"], flags=re.M)
        assert heading is None, (r["title"], heading)
        assert "\n\n\n" not in r["text"]
    assert sum(len(t) for t in texts) > 100_000


def test_wikipedia_sample_packs(wiki, tokenizer):
    _, texts = wiki
    rows = [{"text": t} for t in texts]
    b = next(packed_contexts(DataConfig(context_size=64), tokenizer, "test", 4, rows=rows))
    assert b.ids.shape == (4, 64)
    assert (b.row[b.mask] % 10 == 9).all()
