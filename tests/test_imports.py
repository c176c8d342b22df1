"""``import efla`` stays light (no transformers and its heavy dependencies, no torch._dynamo), yet transformers' Auto
classes know model_type "efla" whenever they are used after it. Each check runs in a fresh interpreter: sys.modules is
the state under test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import efla

HEAVY = ("transformers", "scipy", "PIL", "accelerate", "matplotlib", "lm_eval", "datasets", "fla")
TINY = "vocab_size=32, hidden_size=16, num_hidden_layers=1, num_heads=2"


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that imports this checkout's efla; return its stdout (fail on error)."""
    env = dict(os.environ, PYTHONPATH=str(Path(efla.__file__).parents[1]))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_efla_and_its_cli_load_no_heavy_module():
    out = run_fresh(f"""
        import sys
        import efla, efla.ops, efla.layers
        from efla.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        print(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r})))
    """)
    assert out.splitlines()[-1] == "[]"


@pytest.mark.parametrize("entry", ["import efla", "efla --help"])
def test_import_efla_and_its_help_load_no_compiler(entry):
    """torch._dynamo costs about a second to import (1.1 s over torch on a 2-core machine): ``import efla`` and
    ``efla --help`` leave it to the first thing that compiles. Checked in a fresh interpreter, where nothing has loaded
    it yet (``python -m efla --help`` run as the command runs it)."""
    run = "import efla" if entry == "import efla" else """
        import runpy
        sys.argv = ["efla", "--help"]
        try:
            runpy.run_module("efla", run_name="__main__")
        except SystemExit:
            pass
    """
    out = run_fresh("import sys\n" + textwrap.dedent(run) + "\nprint('torch._dynamo' in sys.modules)")
    assert out.splitlines()[-1] == "False", f"{entry} imported torch._dynamo"


needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers not installed")


@needs_transformers
@pytest.mark.parametrize("transformers_first", [
    "",  # nothing of transformers loaded before efla: the import hook registers
    "from transformers import AutoConfig",  # Auto machinery already loaded: registered during import efla
    "import transformers",  # transformers loaded, Auto machinery not yet
])
def test_auto_classes_know_efla_after_import_efla(transformers_first):
    out = run_fresh(f"""
        {transformers_first}
        import efla
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.for_model("efla", {TINY})
        model = AutoModelForCausalLM.from_config(config)
        print(type(config).__name__, type(model).__name__, type(model) is efla.EFLAForCausalLM)
    """)
    assert out.split() == ["EFLAConfig", "EFLAForCausalLM", "True"]


@needs_transformers
def test_registration_waits_for_transformers_own_import_to_finish():
    # transformers.modeling_layers imports the Auto classes part-way through its own import; registering there (which
    # imports efla's model, which imports modeling_layers) would hit a half-initialised module
    out = run_fresh(f"""
        import sys
        import efla
        from transformers.modeling_layers import GradientCheckpointingLayer
        print("efla.models" in sys.modules)
        from transformers import AutoConfig, AutoModel
        print(type(AutoModel.from_config(AutoConfig.for_model("efla", {TINY}))).__name__)
    """)
    assert out.split() == ["True", "EFLAModel"]
