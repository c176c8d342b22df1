"""efla.eval.perplexity against straightforward loops: whole documents, plain chunks, one target at a time."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from efla.cli import main
from efla.eval import load_checkpoint, perplexity, read_texts


def _document(tokenizer, text: str) -> list[int]:
    return [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def _nll(model, inputs: list[int], targets: list[int]) -> float:
    """Summed NLL of the last len(targets) next-token predictions of one forward pass over ``inputs``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits[0, -len(targets):]
    return F.cross_entropy(logits.double(), torch.tensor(targets), reduction="sum").item()


def test_long_context_equals_whole_documents(model, tokenizer, texts):
    """With a context longer than every document, perplexity is exp(mean NLL) of one pass per document."""
    nll, tokens = 0.0, 0
    for text in texts:
        ids = _document(tokenizer, text)
        nll += _nll(model, ids[:-1], ids[1:])
        tokens += len(ids) - 1
    result = perplexity(model, tokenizer, texts, context=1000, batch_size=4)
    assert result.tokens == tokens and result.documents == len(texts)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    assert result.bytes == num_bytes > sum(len(text) for text in texts)  # UTF-8 bytes, not characters
    assert result.bits_per_byte == pytest.approx(nll / num_bytes / math.log(2), rel=1e-5)


def test_stride_equal_to_context_is_plain_chunks(model, tokenizer, texts):
    """stride == context (and the default stride): chunk k predicts targets k*C+1 .. (k+1)*C from the C tokens
    before the chunk's end; the last chunk ends at the document's end."""
    context = model.config.max_position_embeddings
    nll, tokens = 0.0, 0
    for text in texts:
        ids = _document(tokenizer, text)
        n = len(ids) - 1
        for first in range(0, n, context):
            end = min(first + context, n)
            nll += _nll(model, ids[max(0, end - context):end], ids[first + 1:end + 1])
            tokens += end - first
    assert max(len(_document(tokenizer, t)) for t in texts) > 3 * context  # several chunks, a partial last one
    for stride in (context, None):
        result = perplexity(model, tokenizer, texts, stride=stride, batch_size=3)
        assert (result.context, result.stride, result.tokens) == (context, context, tokens)
        assert result.nll == pytest.approx(nll, rel=1e-5)


def test_stride_one_gives_every_token_the_full_context(model, tokenizer, texts):
    """stride 1: target t is predicted from the min(t, context) tokens before it."""
    context = 6
    nll, tokens = 0.0, 0
    for text in texts[:3]:
        ids = _document(tokenizer, text)
        for t in range(1, len(ids)):
            nll += _nll(model, ids[max(0, t - context):t], [ids[t]])
            tokens += 1
    result = perplexity(model, tokenizer, texts[:3], context=context, stride=1, batch_size=64)
    assert result.tokens == tokens
    assert result.nll == pytest.approx(nll, rel=1e-5)


def test_every_token_is_scored_once_whatever_the_stride_and_batch(model, tokenizer, texts):
    """Windows overlap but score disjoint targets; right padding of shorter windows in a batch changes nothing."""
    chunks = perplexity(model, tokenizer, texts, batch_size=1)
    for stride in (1, 5, 11):
        alone = perplexity(model, tokenizer, texts, stride=stride, batch_size=1)
        batched = perplexity(model, tokenizer, texts, stride=stride, batch_size=7)
        assert alone.tokens == batched.tokens == chunks.tokens
        assert batched.nll == pytest.approx(alone.nll, rel=1e-5)


def test_bad_input_gives_clear_errors(model, tokenizer, texts, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="all 2 documents are empty"):
        perplexity(model, tokenizer, ["", ""])
    with pytest.raises(ValueError, match="all 0 documents are empty"):
        perplexity(model, tokenizer, [])
    with pytest.raises(ValueError, match=r"stride must be in \[1, context=16\] \(got 17\)"):
        perplexity(model, tokenizer, texts, stride=17)
    with pytest.raises(TypeError, match="strings"):
        perplexity(model, tokenizer, [b"bytes"])
    with pytest.raises(FileNotFoundError, match=r"text file .*missing\.txt does not exist"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no string field 'text'"):
        read_texts([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_checkpoint(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*bare .*--tokenizer"):
        load_checkpoint(bare)


def test_cli_reads_files_and_writes_json(model, tokenizer, texts, checkpoint, tmp_path, capsys):
    """efla eval ppl on a .jsonl and a .txt file gives the library's numbers for the same documents."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:-1]) + "\n")
    (tmp_path / "last.txt").write_text(texts[-1])
    out = tmp_path / "out" / "ppl.json"
    main(["eval", "ppl", "--model", str(checkpoint), "--files", str(tmp_path / "docs.jsonl"),
          str(tmp_path / "last.txt"), "--stride", "8", "--batch-size", "4", "--device", "cpu", "--output", str(out)])
    record = json.loads(out.read_text())
    expected = perplexity(model, tokenizer, texts, stride=8)
    assert (record["tokens"], record["bytes"], record["documents"], record["context"], record["stride"]) == (
        expected.tokens, expected.bytes, len(texts), model.config.max_position_embeddings, 8)
    assert record["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    printed = capsys.readouterr().out.split()
    assert float(printed[printed.index("perplexity") + 1]) == pytest.approx(expected.perplexity, rel=1e-5)
