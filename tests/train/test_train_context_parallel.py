"""``efla train --context-parallel N``: a run whose rows are split along T over 2 gloo ranks follows the one-process
run with the same global batch step by step, resumes exactly, and bad settings fail with one line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import efla  # also registers model_type "efla" with the Auto classes
from efla.train import TrainConfig, train

STEPS = 20
# packed rows of 32 tokens with document boundaries; 4 rows per step (the same global batch in every run)
# (validation on 4 held-out rows at steps 10 and 20)
SETTINGS = dict(max_steps=STEPS, save_every=10, warmup_steps=4, micro_batch_size=2, grad_accum=2, val_every=10,
                val_rows=4)


def _metrics(out_dir: Path) -> dict[int, dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def _torchrun(settings: dict, processes: int) -> None:
    """``efla train`` under torchrun with ``processes`` gloo ranks (killed after 150 s)."""
    flags = []
    for name, value in settings.items():
        flags.append("--" + name.replace("_", "-"))
        flags.extend(map(str, value) if isinstance(value, list) else [str(value)])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "efla", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(efla.__file__).parents[1])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=150)
    finally:  # never leave workers behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def one_process_run(run_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cp1")
    train(TrainConfig(**{**run_args, **SETTINGS}, out_dir=str(out)))
    return out


@pytest.fixture(scope="module")
def context_parallel_run(run_args, tmp_path_factory) -> Path:
    """The same run with each row split over 2 context ranks (one data group), sharded by FSDP2."""
    out = tmp_path_factory.mktemp("cp2")
    _torchrun({**run_args, **SETTINGS, "context_parallel": 2, "strategy": "fsdp", "out_dir": out}, processes=2)
    return out


def _assert_same_run(run: Path, reference: Path, steps: list[int]) -> None:
    ran, expected = _metrics(run), _metrics(reference)
    assert sorted(ran) == steps
    for step in steps:
        assert ran[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=0), step
        assert ran[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5, abs=0), step
        assert ran[step]["tokens"] == expected[step]["tokens"], step
    for step in (10, STEPS):
        assert ran[step]["val_loss"] == pytest.approx(expected[step]["val_loss"], rel=1e-5, abs=0), step
    final, reference_state = (AutoModelForCausalLM.from_pretrained(str(p / "model")).state_dict()
                              for p in (run, reference))
    for name, tensor in reference_state.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-4, rtol=0, msg=name)


def test_context_parallel_run_follows_the_one_process_run(context_parallel_run, one_process_run):
    _assert_same_run(context_parallel_run, one_process_run, list(range(1, STEPS + 1)))
    # the loss fell: the comparison is over a run that learns, not over 20 copies of the initial loss
    losses = _metrics(one_process_run)
    assert losses[STEPS]["loss"] < losses[1]["loss"] - 0.5


def test_data_and_context_parallel_run_follows_the_one_process_run(one_process_run, run_args, tmp_path):
    """4 ranks as a 2 x 2 (data x context) mesh under DDP: 2 data groups of 1 row per micro-batch, 2 accumulation
    steps (the same 4-row global batch), each row split over 2 context ranks."""
    _torchrun({**run_args, **SETTINGS, "micro_batch_size": 1, "context_parallel": 2, "strategy": "ddp",
               "out_dir": tmp_path}, processes=4)
    _assert_same_run(tmp_path, one_process_run, list(range(1, STEPS + 1)))


def test_context_parallel_run_resumes_exactly(context_parallel_run, run_args, tmp_path):
    """Stopped at step 10 and resumed (DDP this time) to step 20: the steps of the straight run."""
    checkpoint = tmp_path / "checkpoints" / "step_00000010"
    shutil.copytree(context_parallel_run / "checkpoints" / "step_00000010", checkpoint)
    _torchrun({**run_args, **SETTINGS, "context_parallel": 2, "strategy": "ddp", "out_dir": tmp_path,
               "resume": checkpoint}, processes=2)
    ran, straight = _metrics(tmp_path), _metrics(context_parallel_run)
    assert sorted(ran) == list(range(11, STEPS + 1))
    for step in ran:
        for key in ("loss", "grad_norm", "lr") + (("val_loss",) if step == STEPS else ()):
            assert ran[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(context_parallel=0), "context_parallel must be >= 1 (got 0)"),
    (dict(context_parallel=4, seq_len=3), "seq_len 3 must be >= context_parallel 4"),
])
def test_bad_context_parallel_settings_are_one_line_errors(settings, message, run_args):
    with pytest.raises(ValueError, match=r"^[^\n]*$") as error:
        TrainConfig(**{**run_args, **settings})
    assert message in str(error.value)


def test_context_parallel_must_divide_the_world_size(run_args, tmp_path):
    """One process cannot hold 2 context ranks: refused before anything is read or written."""
    with pytest.raises(ValueError, match=r"^context_parallel 2 must divide the world size 1 [^\n]*$"):
        train(TrainConfig(**run_args, context_parallel=2, out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_context_parallel_refuses_softmax_layers_before_any_work(run_args, tmp_path, monkeypatch):
    """A hybrid model is refused before the corpus is read (the world check is stubbed)."""
    from efla.train import loop
    from efla.train.distributed import World

    monkeypatch.setattr(loop, "init_world", lambda device, cp: World(0, 1, torch.device("cpu"), cp, None))
    monkeypatch.setattr(loop._Run, "_corpus", lambda self: pytest.fail("the corpus was read"))
    config = TrainConfig(**run_args, context_parallel=2, model_overrides={"attn_layers": [1]},
                         out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"^context_parallel 2 does not support softmax attention layers "
                                         r"\(attn_layers \[1\]\)[^\n]*$"):
        train(config)
