"""With only the core install (no transformers, no lm-eval), the commands that need an extra say which one to
install in one line, and ``efla tokenizer train`` works with the `tokenizers` package alone (issue 16)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import efla

pytest.importorskip("tokenizers")

# None in sys.modules: `import transformers` fails and find_spec reports it absent, as in an environment without it
_WITHOUT = ("import sys; sys.modules.update(transformers=None, lm_eval=None); "
            "from efla.cli import main; main(sys.argv[1:])")


def _efla_without_extras(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(efla.__file__).parents[1])}
    return subprocess.run([sys.executable, "-c", _WITHOUT, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_commands_name_the_missing_extra(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    built = _efla_without_extras("tokenizer", "train", "--data", text, "--out", tmp_path / "tok", "--vocab-size", 270)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for argv, extra in [
        (["train", "--tokenizer", tmp_path / "tok", "--data", text, "--max-steps", 1, "--out-dir", tmp_path / "r"],
         "hf"),
        (["eval", "ppl", "--model", tmp_path / "model", "--files", text], "hf"),
        (["eval", "harness", "--model", tmp_path / "model", "--tasks", "efla_smoke_ppl"], "eval"),
    ]:
        result = _efla_without_extras(*argv)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert f"of the '{extra}' extra: pip install 'efla[{extra}]'" in line, line


def test_exactness_names_the_plotting_extra_before_any_work(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(efla.__file__).parents[1])}
    code = ("import sys; sys.modules['matplotlib'] = None; from efla.cli import main; main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, "exactness", "--out", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "'matplotlib' of the 'smnist' extra: pip install 'efla[smnist]'" in line, line
    assert not (tmp_path / "out").exists()  # refused before computing or writing anything


def test_every_parser_refuses_abbreviated_options():
    """argparse's prefix matching turns `--seed 2` into `--seeds 2`; every parser in the project switches it off."""
    root = Path(efla.__file__).parents[2]
    sources = [*root.glob("src/efla/**/*.py"), *root.glob("scripts/*.py"), *root.glob("benchmarks/*.py")]
    calls = [(path, call) for path in sources
             for call in re.findall(r"ArgumentParser\(((?:[^()]|\([^()]*\))*)\)", path.read_text())]
    assert len(calls) >= 10
    missing = [f"{path.name}: ArgumentParser({call})" for path, call in calls if "allow_abbrev=False" not in call]
    assert not missing, missing
