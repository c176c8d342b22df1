"""Shared fixtures: a tiny corpus built from text that ships with Python (module docstrings and the license), a
byte-level BPE tokenizer trained on it, and one reference training run that several tests compare against."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from efla.train import TrainConfig, train, train_tokenizer
from efla.train.data import expand_paths, read_documents

MODULES = ["json", "os", "re", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "typing",
           "unittest", "logging", "asyncio", "dataclasses", "inspect", "pickle", "random", "statistics", "email"]
RUN = dict(model="tiny", seq_len=32, micro_batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, save_every=3,
           keep_checkpoints=4, seed=7)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder with a .jsonl of standard-library docstring paragraphs (one document each, so that many rows hold
    document boundaries) and Python's LICENSE as .txt."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = [p for name in MODULES for p in (importlib.import_module(name).__doc__ or "").split("\n\n") if p.strip()]
    (folder / "docstrings.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "license.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text())
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(read_documents(expand_paths([str(corpus)])), folder, vocab_size=320)
    return folder


@pytest.fixture(scope="session")
def run_args(corpus, tokenizer_dir, tmp_path_factory) -> dict:
    """The settings shared by the reference run and the runs compared with it (out_dir aside)."""
    cache = tmp_path_factory.mktemp("cache")
    return dict(RUN, tokenizer=str(tokenizer_dir), data=[str(corpus)], cache_dir=str(cache))


@pytest.fixture(scope="session")
def reference_run(run_args, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (checkpoints at steps 3 and 6); returns its out_dir."""
    out = tmp_path_factory.mktemp("reference")
    train(TrainConfig(**run_args, out_dir=str(out)))
    return out



@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository (e.g. "benchmarks/scaling.py") as a module."""

    def load(relative: str):
        path = Path(__file__).resolve().parents[2] / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
