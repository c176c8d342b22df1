"""EFLA vs DeltaNet language-modelling comparison over seeds: the same small model in each mode, trained on the same
corpus for the same tokens, at every learning rate of a small sweep and every seed; held-out perplexity of each run,
and its mean and spread over seeds.

    python scripts/build_corpus.py --out runs/corpus          # once: the Debian documentation corpus
    efla compare-lm --corpus runs/corpus --out runs/compare --gpus 0 0 0 --lrs 2e-3 --seeds 0 1 2
    efla compare-lm ... --modes efla delta gated-efla gated-delta     # with the decay-gated modes

Modes: "efla" and "delta" (DeltaNet: attn_mode "delta"), and with the decay gate "gated-efla" and "gated-delta"
(Gated DeltaNet). Each run is ``efla train`` (the 340M preset's architecture at --hidden-size / --layers / --heads;
compiled on CUDA, its default) followed by ``efla eval ppl`` on the validation and test splits. A one-step run first
tokenises the corpus and compiles the kernels, so that the runs after it start from those caches; then the runs go in
parallel, one per entry of --gpus (repeat an id to share a GPU). Runs with the same seed start from the same weights
and see the same batches. The best learning rate of each mode is the one with the lowest mean validation perplexity
over seeds; its test perplexity (mean +- std over seeds, and each seed's) is the reported number. Writes
results.json, table.md and loss_curves.png (mean over seeds, band from the lowest to the highest seed) under --out,
after every finished run. Each run's record is kept in its folder: running the same command again into the same
--out reuses finished runs and starts unfinished ones afresh, so an interrupted sweep is finished, never redone. A run
that fails (out of memory, a diverged loss) stops none of the others; the sweep then raises RunsFailed naming it.
Ctrl-C (SIGINT) ends the running runs and starts no queued one.

Python use: ``sweep(CompareConfig(corpus=Path("runs/corpus")))``; ``efla compare-lm`` is its command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from queue import Queue

from efla.variants import DISPLAY_NAMES, VARIANTS, variant_fields

COLOURS = {"efla": "tab:blue", "delta": "tab:orange", "gated-efla": "tab:green", "gated-delta": "tab:red"}
RECORD = "record.json"  # a finished run's results, in its folder
RUNNING: set[subprocess.Popen] = set()  # the runs' live processes, stopped together on Ctrl-C
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()


@dataclasses.dataclass
class CompareConfig:
    """The sweep: every (mode, lr, seed) trains the 340M preset's architecture at hidden_size / layers / heads."""

    corpus: Path = Path("runs/corpus")  # folder with train/validation/test.jsonl (from scripts/build_corpus.py)
    tokenizer: Path | None = None  # tokenizer folder (None: corpus/tokenizer-32k)
    out: Path = Path("runs/compare")
    gpus: tuple[str, ...] = ("0",)  # CUDA device ids, one concurrent run each ("cpu": no GPU)
    lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)
    hidden_size: int = 512
    layers: int = 8
    heads: int = 4
    seq_len: int = 2048
    batch: int = 16  # rows of seq_len tokens per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step (the same step in less memory, e.g. runs sharing a GPU)
    max_tokens: int | None = None  # training tokens per run (None: one epoch)
    warmup_steps: int = 50
    modes: tuple[str, ...] = ("efla", "delta")
    seeds: tuple[int, ...] = (0, 1, 2)  # one run per seed of every (mode, lr)

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.corpus / "tokenizer-32k"


class RunsFailed(RuntimeError):
    """Some runs of the sweep failed (each message names its log); the others finished and are reported."""


def check_config(config: CompareConfig) -> None:
    """Raise ValueError naming the setting and what to change, before anything runs."""
    if config.grad_accum < 1 or config.batch < 1:
        raise ValueError(f"--batch and --grad-accum must be >= 1 (got {config.batch}, {config.grad_accum})")
    for split in ("train", "validation", "test"):
        if not (config.corpus / f"{split}.jsonl").is_file():
            raise ValueError(f"--corpus {config.corpus} has no {split}.jsonl; run scripts/build_corpus.py")
    if not config.tokenizer.is_dir():
        raise ValueError(f"--tokenizer {config.tokenizer} is not a folder; train one with efla tokenizer train")
    unknown = sorted(set(config.modes) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--modes {' '.join(unknown)}: not a mode; choose among {' '.join(VARIANTS)}")
    for name in ("modes", "seeds", "lrs"):
        values = list(getattr(config, name))
        if len(set(values)) != len(values):
            raise ValueError(f"--{name} lists a value twice: {values}")


def train_command(config: CompareConfig, mode: str, lr: float, seed: int, out_dir: Path, max_steps: int | None,
                  overwrite: bool = False) -> list[str]:
    overrides = {"hidden_size": config.hidden_size, "num_hidden_layers": config.layers, "num_heads": config.heads,
                 **variant_fields(mode)}
    budget = (["--max-steps", str(max_steps)] if max_steps is not None
              else ["--max-tokens", str(config.max_tokens or epoch_tokens(config))])
    return [sys.executable, "-m", "efla", "train", "--model", "340M", "--model-overrides", json.dumps(overrides),
            "--tokenizer", str(config.tokenizer), "--data", str(config.corpus / "train.jsonl"),
            "--cache-dir", str(config.out / "token_cache"), "--seq-len", str(config.seq_len),
            "--micro-batch-size", str(config.batch), "--grad-accum", str(config.grad_accum), *budget, "--lr", str(lr),
            "--warmup-steps", str(config.warmup_steps),
            "--seed", str(seed), "--out-dir", str(out_dir), "--save-every", "100000", "--log-every", "5",
            *(["--overwrite"] if overwrite else [])]


def epoch_tokens(config: CompareConfig) -> int:
    """Tokens in the training split's token cache (built by the warm-up run)."""
    metas = list((config.out / "token_cache").glob("*/meta.json"))
    if len(metas) != 1:
        raise RuntimeError(f"expected one token cache under {config.out / 'token_cache'}, found {len(metas)}")
    return json.loads(metas[0].read_text())["num_tokens"]


def eval_command(model: Path, files: Path, output: Path, seq_len: int) -> list[str]:
    return [sys.executable, "-m", "efla", "eval", "ppl", "--model", str(model), "--files", str(files),
            "--context", str(seq_len), "--output", str(output)]


def run_logged(command: list[str], log: Path, gpu: str, slots: int) -> None:
    """Run `command` on device `gpu`, output appended to `log`; CPU threads split among the concurrent runs (PyTorch
    would give each run every core, and runs sharing a machine then slow each other down)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // slots))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, OMP_NUM_THREADS=threads)
    with log.open("a") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        with _RUNNING_LOCK:
            if _STOPPING.is_set():
                raise RuntimeError("interrupted")
            child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
            RUNNING.add(child)
        try:
            code = child.wait()
        finally:
            with _RUNNING_LOCK:
                RUNNING.discard(child)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[2:5])} failed; its output is in {log}")


def stop_children() -> None:
    """Start no more runs and end the running ones (Ctrl-C reaches them from a terminal, but not when only this
    process is signalled), waiting for each to exit."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        children = list(RUNNING)
    for child in children:
        child.terminate()
    for child in children:
        child.wait()


def run_name(mode: str, lr: float, seed: int) -> str:
    return f"{mode}_lr{lr:g}_seed{seed}"


def one_run(config: CompareConfig, mode: str, lr: float, seed: int, gpus: Queue) -> dict:
    """Train and evaluate one (mode, lr, seed), or reuse its record from an earlier sweep into the same --out."""
    run_dir = config.out / run_name(mode, lr, seed)
    record_file = run_dir / RECORD
    if record_file.is_file():
        print(f"{run_name(mode, lr, seed)}: finished earlier, reusing {record_file}", flush=True)
        return json.loads(record_file.read_text())
    unfinished = run_dir.exists()  # an interrupted run (no checkpoints are saved): started afresh
    gpu = gpus.get()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt"
        start = time.time()
        run_logged(train_command(config, mode, lr, seed, run_dir, None, overwrite=unfinished), log, gpu,
                   len(config.gpus))
        seconds = time.time() - start
        ppl = {}
        for split in ("validation", "test"):
            output = run_dir / f"ppl_{split}.json"
            run_logged(eval_command(run_dir / "model", config.corpus / f"{split}.jsonl", output, config.seq_len), log,
                       gpu, len(config.gpus))
            ppl[split] = json.loads(output.read_text())
    finally:
        gpus.put(gpu)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"{run_name(mode, lr, seed)}: validation ppl {ppl['validation']['perplexity']:.2f}, "
          f"test ppl {ppl['test']['perplexity']:.2f}, {seconds:.0f} s", flush=True)
    record = {"mode": mode, "lr": lr, "seed": seed, "seconds": seconds, "validation": ppl["validation"],
              "test": ppl["test"], "curve": [(m["step"], m["loss"]) for m in metrics if "loss" in m]}
    record_file.write_text(json.dumps(record))
    return record


def _spread(values: list[float]) -> dict:
    """mean, std (sample; 0 for one value), min, max and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def summarize(runs: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Per (mode, lr): the seeds and the spread of validation / test perplexity and test bits per byte; and per mode
    the (mode, lr) entry with the lowest mean validation perplexity."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["mode"], r["lr"], r["seed"])):
        groups.setdefault((r["mode"], r["lr"]), []).append(r)
    summary = [{"mode": mode, "lr": lr, "seeds": [r["seed"] for r in group],
                "validation_ppl": _spread([r["validation"]["perplexity"] for r in group]),
                "test_ppl": _spread([r["test"]["perplexity"] for r in group]),
                "test_bits_per_byte": _spread([r["test"].get("bits_per_byte", float("nan")) for r in group]),
                "seconds": statistics.fmean(r["seconds"] for r in group)}
               for (mode, lr), group in groups.items()]
    best = {}
    for entry in summary:
        held = best.get(entry["mode"])
        if held is None or entry["validation_ppl"]["mean"] < held["validation_ppl"]["mean"]:
            best[entry["mode"]] = entry
    return summary, best


def write_report(config: CompareConfig, runs: list[dict]) -> None:
    """results.json, table.md and loss_curves.png of the runs finished so far."""
    summary, best = summarize(runs)
    (config.out / "results.json").write_text(json.dumps({"settings": _settings(config),
                                                       "runs": runs, "summary": summary, "best": best}, indent=1))
    lines = ["| mode | lr | seeds | validation ppl | test ppl | test bits/byte | test ppl per seed | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        mark = " (best)" if e is best[e["mode"]] else ""
        per_seed = ", ".join(f"{s}: {v:.2f}" for s, v in zip(e["seeds"], e["test_ppl"]["values"], strict=True))
        lines.append(f"| {e['mode']} | {e['lr']:g}{mark} | {len(e['seeds'])} | {_pm(e['validation_ppl'])} | "
                     f"{_pm(e['test_ppl'])} | {_pm(e['test_bits_per_byte'], 4)} | {per_seed} | {e['seconds']:.0f} |")
    (config.out / "table.md").write_text("\n".join(lines) + "\n")
    plot_curves(runs, best, config.out / "loss_curves.png")


def _settings(config: CompareConfig) -> dict[str, str]:
    """The sweep's settings as text, lists written as lists."""
    return {k: str(list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def _pm(spread: dict, digits: int = 2) -> str:
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def plot_curves(runs: list[dict], best: dict[str, dict], path: Path) -> None:
    """Training loss per (mode, lr): the mean over seeds, a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["lr"]), []).append(r)
    for (mode, lr), group in sorted(groups.items()):
        steps = sorted(set.intersection(*(set(step for step, _ in r["curve"]) for r in group)))
        per_seed = [dict(r["curve"]) for r in group]
        losses = [[curve[step] for curve in per_seed] for step in steps]
        is_best = lr == best[mode]["lr"]
        label = f"{DISPLAY_NAMES[mode]} lr {lr:g}" + (" (best)" if is_best else "") + f", {len(group)} seeds"
        ax.plot(steps, [statistics.fmean(x) for x in losses], color=COLOURS[mode], lw=1.8 if is_best else 0.7,
                alpha=1.0 if is_best else 0.45, label=label)
        if len(group) > 1:
            ax.fill_between(steps, [min(x) for x in losses], [max(x) for x in losses], color=COLOURS[mode],
                            alpha=0.2 if is_best else 0.08, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def sweep(config: CompareConfig) -> None:
    """The warm-up run, then every (mode, lr, seed) on the GPUs in turn, reported after each (results.json, table.md,
    loss_curves.png in config.out). On Ctrl-C the queued runs are dropped and the running ones ended before the
    interrupt goes on; RunsFailed when any run failed."""
    check_config(config)
    config.out.mkdir(parents=True, exist_ok=True)
    _STOPPING.clear()
    warm = config.out / "warmup"
    try:
        run_logged(train_command(config, config.modes[0], config.lrs[0], config.seeds[0], warm, max_steps=1,
                                 overwrite=warm.exists()), config.out / "warmup.log", config.gpus[0], 1)
    except RuntimeError as error:
        raise RunsFailed(f"the warm-up run failed, so no run started: {error}") from error
    jobs = [(mode, lr, seed) for seed in config.seeds for lr in config.lrs for mode in config.modes]
    print(f"corpus: {epoch_tokens(config):,} training tokens; {len(jobs)} runs on GPUs {list(config.gpus)}", flush=True)
    gpus: Queue = Queue()
    for gpu in config.gpus:
        gpus.put(gpu)
    runs, failures = [], []
    pool = ThreadPoolExecutor(len(config.gpus))
    try:
        for future in as_completed([pool.submit(one_run, config, *job, gpus) for job in jobs]):
            try:
                runs.append(future.result())
            except RuntimeError as error:  # one failed run (out of memory, say) stops none of the others
                failures.append(str(error))
                print(f"failed: {error}", flush=True)
                continue
            write_report(config, runs)  # after every run, so an interrupted sweep still leaves its finished runs
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_children()  # before the wait below, which would otherwise last as long as the running runs
        raise
    finally:
        pool.shutdown()
    if runs:
        print((config.out / "table.md").read_text())
    if failures:
        raise RunsFailed(f"{len(failures)} of {len(jobs)} runs failed (their logs say why; the same command again "
                         "reruns only those): " + "; ".join(failures))
