"""scripts/compare_lm.py end to end at toy size: both modes over two seeds trained, evaluated and reported with their
spread; a second call into the same folder reuses the finished runs."""

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

pytest.importorskip("matplotlib")


def _split_corpus(corpus: Path, tmp_path: Path) -> Path:
    """The toy corpus as compare_lm.py reads one: train, validation and test splits of its docstrings."""
    lines = (corpus / "docstrings.jsonl").read_text().splitlines()
    data = tmp_path / "corpus"
    data.mkdir()
    for name, part in (("train", lines[:-8]), ("validation", lines[-8:-4]), ("test", lines[-4:])):
        (data / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return data


def test_compare_lm_reports_modes_over_seeds_and_reuses_finished_runs(corpus, tokenizer_dir, load_script, tmp_path,
                                                                     capsys):
    data = _split_corpus(corpus, tmp_path)
    out = tmp_path / "compare"
    compare_lm = load_script("scripts/compare_lm.py")
    argv = ["--corpus", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--gpus", "cpu",
            "--lrs", "3e-3", "--seeds", "0", "1", "--hidden-size", "32", "--layers", "1", "--heads", "1",
            "--seq-len", "32", "--batch", "4", "--max-tokens", "512", "--warmup-steps", "1"]
    compare_lm.main(argv)
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

    capsys.readouterr()
    compare_lm.main(argv)  # again into the same folder: nothing is trained or lost
    assert capsys.readouterr().out.count("finished earlier, reusing") == 4
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]


def test_a_failed_run_stops_none_of_the_others_and_the_sweep_exits_non_zero(corpus, tokenizer_dir, load_script,
                                                                            tmp_path, capsys):
    """A diverging rate (inf) fails its run; the finished run is still reported, the failure named, the exit non-zero;
    --grad-accum reaches the trainer (two micro-batches per step: half the steps for the same tokens)."""
    data = _split_corpus(corpus, tmp_path)
    out = tmp_path / "compare"
    compare_lm = load_script("scripts/compare_lm.py")
    argv = ["--corpus", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--gpus", "cpu", "--modes",
            "efla", "--lrs", "3e-3", "inf", "--seeds", "0", "--hidden-size", "32", "--layers", "1", "--heads", "1",
            "--seq-len", "32", "--batch", "2", "--grad-accum", "2", "--max-tokens", "512", "--warmup-steps", "1"]
    with pytest.raises(SystemExit, match=r"compare_lm: 1 of 2 runs failed") as stop:
        compare_lm.main(argv)
    assert str(out / "efla_lrinf_seed0" / "log.txt") in str(stop.value)
    results = json.loads((out / "results.json").read_text())
    assert [(r["mode"], r["lr"]) for r in results["runs"]] == [("efla", 3e-3)]
    assert [step for step, _ in results["runs"][0]["curve"]][-1] == 512 // (32 * 2 * 2)
    assert "--grad-accum 2" in (out / "efla_lr0.003_seed0" / "log.txt").read_text()


def test_a_missing_corpus_or_tokenizer_is_a_one_line_usage_error(tmp_path, load_script, capsys):
    compare_lm = load_script("scripts/compare_lm.py")

    def refused(argv: list[str], message: str) -> None:
        with pytest.raises(SystemExit) as stop:
            compare_lm.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err

    refused(["--corpus", str(tmp_path)], f"--corpus {tmp_path} has no train.jsonl")
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a"}\n')
    refused(["--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "tok")], "is not a folder")


def test_ctrl_c_ends_the_running_run_starts_no_other_and_exits_130(tmp_path, load_script, capsys, monkeypatch):
    """Ctrl-C during a sweep (SIGINT to this process alone, as a scheduler sends it): the running training process
    is ended, the queued runs never start, and the sweep says so in one line with 128 + SIGINT."""
    compare_lm = load_script("scripts/compare_lm.py")
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "tok").mkdir()
    started = []

    def sleeping_run(args, mode, lr, seed, out_dir, max_steps, overwrite=False):
        started.append(out_dir.name)
        return [sys.executable, "-c", "pass" if max_steps == 1 else "import time; time.sleep(300)"]

    monkeypatch.setattr(compare_lm, "train_command", sleeping_run)
    monkeypatch.setattr(compare_lm, "epoch_tokens", lambda args: 1000)

    def interrupt_once_the_run_sleeps() -> None:
        deadline = time.monotonic() + 60
        while not any("sleep" in child.args[-1] for child in list(compare_lm._CHILDREN)):
            if time.monotonic() > deadline:
                return  # the assertions below then fail: the sweep ran to its end
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_the_run_sleeps, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        compare_lm.main(["--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--out",
                         str(tmp_path / "out"), "--gpus", "cpu", "--lrs", "1e-3", "--seeds", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 128 + signal.SIGINT
    assert err.strip().splitlines() == [f"compare_lm: interrupted; the finished runs are kept in {tmp_path / 'out'} "
                                        "(the same command reuses them and reruns the others)"]
    assert time.monotonic() - start < 120  # the 300 s run was ended, not waited for
    assert started == ["warmup", "efla_lr0.001_seed0"] and not compare_lm._CHILDREN
