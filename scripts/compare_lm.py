"""EFLA vs DeltaNet language-modelling comparison: the same small model in both modes, trained on the same corpus for
the same tokens with the same seed, each at every learning rate of a small sweep; held-out perplexity of each.

    python scripts/build_corpus.py --out runs/corpus          # once: the Debian documentation corpus
    python scripts/compare_lm.py --corpus runs/corpus --out runs/compare --gpus 0 1 2 3

Each run is ``efla train`` (the 340M preset's architecture at --hidden-size / --layers / --heads) followed by
``efla eval ppl`` on the validation and test splits. A one-step run first tokenises the corpus and compiles the kernels,
so that the runs after it start from those caches; then the runs go in parallel, one per entry of --gpus (repeat an id
to share a GPU). The best learning rate of each mode is the one with the lowest validation perplexity; its test
perplexity is the reported number. Writes results.json, table.md and loss_curves.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from queue import Queue

MODES = ("efla", "delta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"),
                   help="folder with train/validation/test.jsonl (from scripts/build_corpus.py)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: CORPUS/tokenizer-32k)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--gpus", nargs="+", default=["0"], help="CUDA device ids, one concurrent run each")
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3, 8e-3])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="rows of --seq-len tokens per step")
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens per run (default: one epoch)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_command(args: argparse.Namespace, mode: str, lr: float, out_dir: Path, max_steps: int | None) -> list[str]:
    overrides = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "num_heads": args.heads,
                 "attn_mode": mode}
    budget = (["--max-steps", str(max_steps)] if max_steps is not None
              else ["--max-tokens", str(args.max_tokens or epoch_tokens(args))])
    return [sys.executable, "-m", "efla", "train", "--model", "340M", "--model-overrides", json.dumps(overrides),
            "--tokenizer", str(args.tokenizer), "--data", str(args.corpus / "train.jsonl"),
            "--cache-dir", str(args.out / "token_cache"), "--seq-len", str(args.seq_len),
            "--micro-batch-size", str(args.batch), *budget, "--lr", str(lr), "--warmup-steps", str(args.warmup_steps),
            "--seed", str(args.seed), "--out-dir", str(out_dir), "--save-every", "100000", "--log-every", "5"]


def epoch_tokens(args: argparse.Namespace) -> int:
    """Tokens in the training split's token cache (built by the warm-up run)."""
    metas = list((args.out / "token_cache").glob("*/meta.json"))
    if len(metas) != 1:
        raise RuntimeError(f"expected one token cache under {args.out / 'token_cache'}, found {len(metas)}")
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
        if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise RuntimeError(f"{' '.join(command[2:5])} failed; its output is in {log}")


def one_run(args: argparse.Namespace, mode: str, lr: float, gpus: Queue) -> dict:
    """Train and evaluate one (mode, lr); returns its record for results.json."""
    gpu = gpus.get()
    try:
        run_dir = args.out / f"{mode}_lr{lr:g}"
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt"
        start = time.time()
        run_logged(train_command(args, mode, lr, run_dir, None), log, gpu, len(args.gpus))
        seconds = time.time() - start
        ppl = {}
        for split in ("validation", "test"):
            output = run_dir / f"ppl_{split}.json"
            run_logged(eval_command(run_dir / "model", args.corpus / f"{split}.jsonl", output, args.seq_len), log,
                       gpu, len(args.gpus))
            ppl[split] = json.loads(output.read_text())
    finally:
        gpus.put(gpu)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"{mode} lr {lr:g}: validation ppl {ppl['validation']['perplexity']:.2f}, "
          f"test ppl {ppl['test']['perplexity']:.2f}, {seconds:.0f} s", flush=True)
    return {"mode": mode, "lr": lr, "seconds": seconds, "validation": ppl["validation"], "test": ppl["test"],
            "curve": [(m["step"], m["loss"]) for m in metrics]}


def write_report(args: argparse.Namespace, runs: list[dict]) -> None:
    """results.json, table.md and loss_curves.png of the runs finished so far."""
    best = {mode: min((r for r in runs if r["mode"] == mode), key=lambda r: r["validation"]["perplexity"])
            for mode in MODES if any(r["mode"] == mode for r in runs)}
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": runs, "best": best}, indent=1))
    lines = ["| mode | lr | validation ppl | test ppl | test bits/byte | train s |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["mode"], r["lr"])):
        mark = " (best)" if r is best.get(r["mode"]) else ""
        lines.append(f"| {r['mode']} | {r['lr']:g}{mark} | {r['validation']['perplexity']:.2f} | "
                     f"{r['test']['perplexity']:.2f} | {r['test'].get('bits_per_byte', float('nan')):.4f} | "
                     f"{r['seconds']:.0f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"efla": "tab:blue", "delta": "tab:orange"}
    for r in runs:
        steps, losses = zip(*r["curve"], strict=True)
        is_best = r is best.get(r["mode"])
        name = "EFLA" if r["mode"] == "efla" else "DeltaNet"
        ax.plot(steps, losses, color=colours[r["mode"]], lw=1.8 if is_best else 0.7, alpha=1.0 if is_best else 0.45,
                label=f"{name} lr {r['lr']:g}" + (" (best)" if is_best else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "loss_curves.png", dpi=130)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.tokenizer = args.tokenizer or args.corpus / "tokenizer-32k"
    for split in ("train", "validation", "test"):
        if not (args.corpus / f"{split}.jsonl").is_file():
            raise FileNotFoundError(f"--corpus {args.corpus} has no {split}.jsonl; run scripts/build_corpus.py")
    args.out.mkdir(parents=True, exist_ok=True)
    warm = args.out / "warmup"
    run_logged(train_command(args, "efla", args.lrs[0], warm, max_steps=1), args.out / "warmup.log", args.gpus[0], 1)
    print(f"corpus: {epoch_tokens(args):,} training tokens; {len(args.lrs) * len(MODES)} runs on GPUs {args.gpus}",
          flush=True)
    gpus: Queue = Queue()
    for gpu in args.gpus:
        gpus.put(gpu)
    jobs = [(mode, lr) for lr in args.lrs for mode in MODES]
    runs = []
    with ThreadPoolExecutor(len(args.gpus)) as pool:
        for future in as_completed([pool.submit(one_run, args, mode, lr, gpus) for mode, lr in jobs]):
            runs.append(future.result())
            write_report(args, runs)  # after every run, so an interrupted sweep still leaves its finished runs
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
