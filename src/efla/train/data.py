"""Corpora: documents from local files or a Hugging Face dataset, tokenised once into a memory-mapped token file.

A cache folder holds ``tokens.bin`` (all documents' tokens back to back, each followed by the tokenizer's eos token;
uint16 when the vocabulary fits, else uint32), ``doc_starts.npy`` (int64 offset of every document in tokens.bin) and
``meta.json``. Its name is a hash of the sources (paths, sizes, modification times, or the dataset name) and the
tokenizer, so a changed corpus or tokenizer is tokenised again and an unchanged one is reused. The folder is written
under a temporary name and renamed when complete, so an interrupted build never leaves a half cache behind.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
_BATCH_DOCS = 1000  # documents tokenised per call (the fast tokenizer spreads a batch over threads)


@dataclasses.dataclass
class TokenCorpus:
    """A tokenised corpus: ``tokens`` (memory-mapped, read-only) and ``doc_starts`` (sorted offsets, first 0)."""

    tokens: np.ndarray
    doc_starts: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> TokenCorpus:
        """Open a cache folder written by ``build_token_cache``."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
        return cls(tokens, np.load(path / "doc_starts.npy"))


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named by ``paths`` (files, folders searched recursively for .txt/.md/.rst/.jsonl/.parquet, or glob
    patterns, ``**`` included), sorted and de-duplicated so every rank and every run sees the same order."""
    files: set[Path] = set()
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        elif path.is_file():
            files.add(path)
        else:
            matches = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
            if not matches:
                raise FileNotFoundError(f"data path {entry} matches no file")
            files.update(matches)
    return sorted(p.resolve() for p in files)


def read_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """The documents of local files, in order: a text file is one document, a .jsonl file one per line (its
    ``text_field``), a .parquet file one per row of the ``text_field`` column."""
    for path in files:
        try:
            if path.suffix == ".jsonl":
                with path.open(encoding="utf-8") as lines:
                    for number, line in enumerate(lines, 1):
                        if line.strip():
                            yield _field(_json_line(line, f"{path}:{number}"), text_field, f"{path}:{number}")
            elif path.suffix == ".parquet":
                import pyarrow.parquet as pq

                for batch in pq.ParquetFile(path).iter_batches(columns=[text_field]):
                    yield from (text for text in batch.column(0).to_pylist() if text)
            else:
                yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read corpus file {path}: {error}") from error


def dataset_documents(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """The documents of a Hugging Face dataset (streamed, so it is never held in memory)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("--dataset needs the `datasets` package: pip install datasets") from error
    for row in datasets.load_dataset(name, config, split=split, streaming=True):
        yield _field(row, text_field, f"dataset {name}")


def cache_key(sources: dict, tokenizer) -> str:
    """A short hash naming the cache of these sources tokenised by this tokenizer."""
    blob = json.dumps({"sources": sources, "tokenizer": tokenizer.backend_tokenizer.to_str(),
                       "eos": tokenizer.eos_token_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sources(files: list[Path], text_field: str) -> dict:
    """The identity of local files for ``cache_key``: paths, sizes and modification times."""
    return {"files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files], "text_field": text_field}


def build_token_cache(documents: Iterator[str], tokenizer, folder: str | Path) -> TokenCorpus:
    """Tokenise ``documents`` (eos appended to each) into the cache folder ``folder`` and open it; reuse the folder
    when it already exists. Empty documents are skipped; a corpus without any token is an error."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return TokenCorpus.open(folder)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    starts, total = [], 0
    try:
        with (tmp / "tokens.bin").open("wb") as out:
            for batch in _batches(documents, _BATCH_DOCS):
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    if not ids:
                        continue
                    starts.append(total)
                    ids = np.asarray(ids + eos, dtype=dtype)
                    ids.tofile(out)
                    total += len(ids)
            out.flush()
            os.fsync(out.fileno())
        if total == 0:
            raise ValueError("the corpus is empty: no document has any token")
        np.save(tmp / "doc_starts.npy", np.asarray(starts, dtype=np.int64))
        meta = {"dtype": np.dtype(dtype).name, "num_tokens": total, "num_docs": len(starts), "vocab_size": vocab}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another run built the same cache meanwhile (e.g. a sweep sharing cache_dir): use it
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCorpus.open(folder)


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg}); each line must be a JSON object like "
                         '{"text": "..."}') from None


def _field(record: object, text_field: str, where: str) -> str:
    """The text of one record: a string or null (an empty document); anything else names the record."""
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{where}: no field {text_field!r} (set --text-field)")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} holds {type(text).__name__} {text!r:.40}, not text")
    return text or ""
