"""The memory-mapped token cache: exact tokens and document starts, reuse, and clear errors for bad corpora."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from efla.train import TrainConfig, load_tokenizer, train
from efla.train.data import build_token_cache, dataset_documents, expand_paths, read_documents


def test_cache_holds_every_document_followed_by_eos(corpus, tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    documents = list(read_documents(expand_paths([str(corpus)])))
    assert len(documents) > 10
    cache = build_token_cache(iter(documents), tokenizer, tmp_path / "c")
    assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint16
    ends = [*cache.doc_starts[1:].tolist(), len(cache.tokens)]
    for doc, start, end in zip(documents, cache.doc_starts.tolist(), ends, strict=True):
        expected = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert cache.tokens[start:end].tolist() == expected
    # an existing cache is opened, not rebuilt (the documents are not read again)
    again = build_token_cache(iter(()), tokenizer, tmp_path / "c")
    np.testing.assert_array_equal(again.tokens, cache.tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left


def test_cache_built_meanwhile_by_another_run_is_used(corpus, tokenizer_dir, tmp_path):
    """Two runs sharing cache_dir tokenise the same corpus at once: the one finishing second uses the first's."""
    tokenizer = load_tokenizer(tokenizer_dir)
    documents = list(read_documents(expand_paths([str(corpus)])))[:20]

    def racing_documents():  # the other run (another process, so another temporary folder) finishes first
        build_token_cache(iter(documents), tokenizer, tmp_path / "other" / "c")
        (tmp_path / "other" / "c").rename(tmp_path / "c")
        yield from documents

    cache = build_token_cache(racing_documents(), tokenizer, tmp_path / "c")
    assert len(cache.tokens) == json.loads((tmp_path / "c" / "meta.json").read_text())["num_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "other"]  # no temporary folder left


def test_documents_from_jsonl_text_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    (tmp_path / "b.txt").write_text("three")
    assert list(read_documents(expand_paths([str(tmp_path)]), "body")) == ["one", "two", "three"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["four", "", "five"]}), tmp_path / "c.parquet")
    assert list(read_documents(expand_paths([str(tmp_path / "c.parquet")]), "body")) == ["four", "five"]


def test_bad_corpora_and_settings_get_clear_messages(corpus, tokenizer_dir, tmp_path):
    base = dict(model="tiny", tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"),
                out_dir=str(tmp_path / "run"), seq_len=32, micro_batch_size=2, max_steps=1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        train(TrainConfig(**base, data=[str(tmp_path / "empty.txt")]))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    with pytest.raises(ValueError, match=r"cannot read corpus file .*binary\.txt"):
        train(TrainConfig(**base, data=[str(tmp_path / "binary.txt")]))
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no field 'text'"):
        train(TrainConfig(**base, data=[str(tmp_path / "bad.jsonl")]))
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder .* does not exist"):
        train(TrainConfig(**{**base, "tokenizer": str(tmp_path / "no_tokenizer")}, data=[str(corpus)]))
    with pytest.raises(ValueError, match="seq_len 4096 is longer than the model's max_position_embeddings 512"):
        train(TrainConfig(**{**base, "seq_len": 4096}, data=[str(corpus)]))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in"):
        train(TrainConfig(**base, data=[str(corpus)], resume="latest"))
    with pytest.raises(ValueError, match="one step needs 4000"):
        train(TrainConfig(**{**base, "micro_batch_size": 4000}, data=[str(corpus)]))
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_hugging_face_dataset_is_streamed(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first"}, {"text": "second"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(dataset_documents("org/corpus", "en", "train", "text")) == ["first", "second"]
    assert calls == [("org/corpus", "en", "train", True)]
