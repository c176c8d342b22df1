"""``efla compare-lm`` end to end at toy size: both modes over two seeds trained, evaluated and reported with their
spread; a second call into the same folder reuses the finished runs; failures, bad input and Ctrl-C as exit codes."""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
from command_line import run_efla

from efla.experiments import compare_lm

pytest.importorskip("matplotlib")



def _split_corpus(corpus: Path, tmp_path: Path) -> Path:
    """The toy corpus as efla compare-lm reads one: train, validation and test splits of its docstrings."""
    lines = (corpus / "docstrings.jsonl").read_text().splitlines()
    data = tmp_path / "corpus"
    data.mkdir()
    for name, part in (("train", lines[:-8]), ("validation", lines[-8:-4]), ("test", lines[-4:])):
        (data / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return data


def test_compare_lm_reports_modes_over_seeds_and_reuses_finished_runs(corpus, tokenizer_dir, tmp_path, capsys):
    data = _split_corpus(corpus, tmp_path)
    out = tmp_path / "compare"
    argv = ["compare-lm", "--corpus", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--gpus", "cpu",
            "--lrs", "3e-3", "--seeds", "0", "1", "--hidden-size", "32", "--layers", "1", "--heads", "1",
            "--seq-len", "32", "--batch", "4", "--max-tokens", "512", "--warmup-steps", "1"]
    code, _, err = run_efla(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["mode"], r["seed"]) for r in results["runs"]) == [("delta", 0), ("delta", 1), ("efla", 0),
                                                                       ("efla", 1)]
    for run in results["runs"]:
        assert run["curve"], run["mode"]
        for split in ("validation", "test"):
            assert 1.0 < run[split]["perplexity"] < 1e4, (run["mode"], split, run[split])
    efla_runs = [r for r in results["runs"] if r["mode"] == "efla"]
    assert efla_runs[0]["curve"] != efla_runs[1]["curve"]  # the seeds differ
    for entry in results["summary"]:
        tests = [r["test"]["perplexity"] for r in results["runs"] if r["mode"] == entry["mode"]]
        assert entry["seeds"] == [0, 1]
        assert entry["test_ppl"]["mean"] == pytest.approx(statistics.fmean(tests))
        assert entry["test_ppl"]["std"] == pytest.approx(statistics.stdev(tests))
    assert set(results["best"]) == {"efla", "delta"}
    table = (out / "table.md").read_text()
    assert "| efla | 0.003 (best) | 2 |" in table and "| delta | 0.003 (best) | 2 |" in table
    assert (out / "loss_curves.png").stat().st_size > 10_000

    code, printed, _ = run_efla(argv, capsys)  # again into the same folder: nothing is trained or lost
    assert code == 0 and printed.count("finished earlier, reusing") == 4
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]


def test_a_failed_run_stops_none_of_the_others_and_the_sweep_exits_1(corpus, tokenizer_dir, tmp_path, capsys):
    """A diverging rate (inf) fails its run; the finished run is still reported, the failure named in one line, the
    exit code 1 (work that did not finish); --grad-accum reaches the trainer (two micro-batches per step: half the
    steps for the same tokens)."""
    data = _split_corpus(corpus, tmp_path)
    out = tmp_path / "compare"
    argv = ["compare-lm", "--corpus", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--gpus", "cpu",
            "--modes", "efla", "--lrs", "3e-3", "inf", "--seeds", "0", "--hidden-size", "32", "--layers", "1",
            "--heads", "1", "--seq-len", "32", "--batch", "2", "--grad-accum", "2", "--max-tokens", "512",
            "--warmup-steps", "1"]
    code, _, err = run_efla(argv, capsys)
    (line,) = err.splitlines()
    assert code == 1 and line.startswith("efla compare-lm: error: 1 of 2 runs failed"), err
    assert str(out / "efla_lrinf_seed0" / "log.txt") in line
    results = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["lr"]) for r in results["runs"]] == [("efla", 3e-3)]
    assert [step for step, _ in results["runs"][0]["curve"]][-1] == 512 // (32 * 2 * 2)
    assert "--grad-accum 2" in (out / "efla_lr0.003_seed0" / "log.txt").read_text()


def test_a_missing_corpus_or_tokenizer_is_a_one_line_usage_error(tmp_path, capsys):
    def refused(argv: list[str], message: str) -> None:
        code, _, err = run_efla(["compare-lm", *argv, "--out", str(tmp_path / "out")], capsys)
        (line,) = err.splitlines()
        assert code == 2 and message in line and line.startswith("efla compare-lm: error: "), err
        assert not (tmp_path / "out").exists()  # refused before anything ran or was written

    refused(["--corpus", str(tmp_path)], f"--corpus {tmp_path} has no train.jsonl")
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a"}\n')
    refused(["--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "tok")], "is not a folder")
    (tmp_path / "tok").mkdir()
    refused(["--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "tok")], "could not load a tokenizer")
    refused(["--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--seeds", "0", "0"],
            "--seeds lists a value twice")


def test_ctrl_c_ends_the_running_run_starts_no_other_and_exits_130(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Ctrl-C during a sweep (SIGINT to this process alone, as a scheduler sends it): the running training process
    is ended, the queued runs never start, and the sweep says so in one line with 128 + SIGINT."""
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a"}\n')
    started = []

    def sleeping_run(config, mode, lr, seed, out_dir, max_steps, overwrite=False):
        started.append(out_dir.name)
        return [sys.executable, "-c", "pass" if max_steps == 1 else "import time; time.sleep(300)"]

    monkeypatch.setattr(compare_lm, "train_command", sleeping_run)
    monkeypatch.setattr(compare_lm, "epoch_tokens", lambda config: 1000)

    def interrupt_once_the_run_sleeps() -> None:
        deadline = time.monotonic() + 60
        while not any("sleep" in child.args[-1] for child in list(compare_lm.RUNNING)):
            if time.monotonic() > deadline:
                return  # the assertions below then fail: the sweep ran to its end
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_the_run_sleeps, daemon=True).start()
    start = time.monotonic()
    code, _, err = run_efla(["compare-lm", "--corpus", str(tmp_path), "--tokenizer", str(tokenizer_dir), "--out",
                          str(tmp_path / "out"), "--gpus", "cpu", "--lrs", "1e-3", "--seeds", "0"], capsys)
    assert code == 128 + signal.SIGINT
    assert err.strip().splitlines() == [f"efla compare-lm: interrupted; what finished before it is kept in "
                                        f"{tmp_path / 'out'}"]
    assert time.monotonic() - start < 120  # the 300 s run was ended, not waited for
    assert started == ["warmup", "efla_lr0.001_seed0"] and not compare_lm.RUNNING
