"""The trainer: exact resume, checkpoints on SIGTERM, DDP and FSDP2 runs that follow a single-process run, and the
final model folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import efla  # also registers model_type "efla" with the Auto classes
from efla.train import TrainConfig, train
from efla.train.data import TokenCorpus
from efla.train.loop import BatchTooLargeError, _Run
from efla.train.packing import PackedRows, StepSampler


def _metrics(out_dir: Path) -> dict[int, dict]:
    """A run's metrics records by step (the last record of a step wins)."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def _flags(settings: dict) -> list[str]:
    """Command-line flags for TrainConfig settings."""
    flags = []
    for name, value in settings.items():
        flags.append("--" + name.replace("_", "-"))
        flags.extend(map(str, value) if isinstance(value, list) else [str(value)])
    return flags


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(efla.__file__).parents[1])}


def test_resume_continues_exactly(reference_run, run_args, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    train(TrainConfig(**run_args, out_dir=str(out), resume=str(out / "checkpoints" / "step_00000003")))
    reference, resumed = _metrics(reference_run), _metrics(out)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == pytest.approx(reference[step][key], abs=1e-6, rel=0)
    final, expected = (AutoModelForCausalLM.from_pretrained(str(p / "model")).state_dict()
                       for p in (out, reference_run))
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_final_model_loads_with_auto_classes(reference_run, run_args):
    model = AutoModelForCausalLM.from_pretrained(str(reference_run / "model"))
    assert model.config.model_type == "efla" and model.config.vocab_size == 320
    checkpoint = AutoModelForCausalLM.from_pretrained(str(reference_run / "checkpoints" / "step_00000006"))
    for (name, a), (_, b) in zip(model.state_dict().items(), checkpoint.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (reference_run / "model" / "tokenizer.json").is_file()
    assert (reference_run / "checkpoints" / "latest").read_text() == "step_00000006"
    records = _metrics(reference_run)
    assert sorted(records) == list(range(1, 7))
    # the run trained across document boundaries (so the parallel runs compared with it do too)
    (cache,) = Path(run_args["cache_dir"]).iterdir()
    rows = PackedRows(TokenCorpus.open(cache), seq_len=32)
    used = np.concatenate([StepSampler(len(rows), 4, seed=7).step_rows(step) for step in range(6)])
    assert rows.num_targets(used, flatten=False) - rows.num_targets(used, flatten=True) > 5
    assert records[6]["loss"] < records[1]["loss"]
    assert records[6]["tokens"] == 6 * 4 * 32


@pytest.mark.parametrize(("strategy", "micro_batch_size", "grad_accum"), [("ddp", 1, 2), ("fsdp", 2, 1)])
def test_two_process_run_follows_the_single_process_run(strategy, micro_batch_size, grad_accum, reference_run,
                                                        run_args, tmp_path):
    """Same global batch (4 rows) split over 2 gloo ranks (and, for DDP, 2 accumulation steps)."""
    settings = {**run_args, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "strategy": strategy,
                "out_dir": tmp_path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "efla", "train", *_flags(settings)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    finally:  # never leave workers behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    reference, parallel = _metrics(reference_run), _metrics(tmp_path)
    assert sorted(parallel) == sorted(reference)
    for step in reference:
        assert parallel[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-4, rel=0), step
    final, expected = (AutoModelForCausalLM.from_pretrained(str(p / "model")).state_dict()
                       for p in (tmp_path, reference_run))
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-4, rtol=0, msg=name)


def test_sigterm_saves_a_checkpoint_and_stops(run_args, tmp_path):
    settings = {**run_args, "max_steps": 100000, "save_every": 100000, "out_dir": tmp_path}
    process = subprocess.Popen([sys.executable, "-m", "efla", "train", *_flags(settings)], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no training step logged within 120 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # unfinished: `efla train && next` stops
    assert "stopped by SIGTERM after step" in stderr and "continue with the same command and --resume" in stderr
    last = max(_metrics(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{last:08d}"
    assert torch.load(checkpoints / f"step_{last:08d}" / "trainer_state.pt", weights_only=True)["step"] == last
    assert [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")] == []
    assert not (tmp_path / "model").exists()  # no final model for an unfinished run


def test_out_of_memory_names_the_batch_size_and_keeps_the_finished_steps(run_args, tmp_path, monkeypatch):
    real_loss = _Run._loss_sum

    def loss_that_runs_out_of_memory_at_step_3(self, batch):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, batch)

    monkeypatch.setattr(_Run, "_loss_sum", loss_that_runs_out_of_memory_at_step_3)
    expected = r"out of memory .* micro_batch_size 4 \(seq_len 32\) at step 3"
    with pytest.raises(BatchTooLargeError, match=expected) as error:
        train(TrainConfig(**{**run_args, "save_every": 100}, out_dir=str(tmp_path)))
    assert "state after step 2 is saved" in str(error.value)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"


def test_profile_steps_write_an_operator_table_and_a_trace(run_args, reference_run, tmp_path):
    """--profile-steps 2 profiles steps 4-5 and leaves the training itself unchanged."""
    train(TrainConfig(**{**run_args, "profile_steps": 2, "out_dir": str(tmp_path)}))
    table = (tmp_path / "profile.txt").read_text()
    assert table.startswith("2 training step(s) after 3 warm-up steps")
    assert "aten::mm" in table or "aten::addmm" in table  # the projections' matrix products were recorded
    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    profiled, reference = _metrics(tmp_path), _metrics(reference_run)
    assert [profiled[s]["loss"] for s in sorted(profiled)] == [reference[s]["loss"] for s in sorted(reference)]
    with pytest.raises(ValueError, match="profile_steps must be >= 0"):
        TrainConfig(**{**run_args, "profile_steps": -1, "out_dir": str(tmp_path)})
