"""Weak scaling of ``efla train`` on the GPUs of one host: the same per-GPU batch on N = 1, 2, 4, ... GPUs.

    python benchmarks/scaling.py --tokenizer tok/ --data corpus/ --preset 1.3B --strategy fsdp --gpus 1 2 4 8 \\
        --micro-batch-size 4 --steps 200 --out runs/scaling

For each N it runs ``torchrun --standalone --nproc_per_node N -m efla train`` for --steps steps (same seed and
per-GPU micro-batch, bf16 on GPU) and reads the run's metrics.jsonl: tokens/s (median over the steps after --skip),
tokens/s per GPU, weak-scaling efficiency (tokens/s at N over N x tokens/s at 1) and rank 0's peak memory. With
--same-global-batch it also runs one process with N_max-fold gradient accumulation: the trainer gives every step the
same rows whatever the world size, so its losses must follow those of the N_max run over its --accum-steps steps;
it reports the largest loss difference. Writes scaling.json, table.md and loss_curves.png under --out. Extra
``efla train`` flags go after ``--``. Across hosts, run ``efla train`` with torchrun's rendezvous flags
(docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--data", nargs="+", required=True, help="corpus files or folders (as efla train --data)")
    p.add_argument("--preset", default="1.3B", help="model preset or config (efla train --model)")
    p.add_argument("--strategy", default="fsdp", choices=("ddp", "fsdp"))
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8], help="world sizes to run, 1 first")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per GPU per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the tokens/s median (warm-up)")
    p.add_argument("--same-global-batch", action="store_true",
                   help="also run 1 process with N_max-fold accumulation and compare its losses with the N_max run")
    p.add_argument("--accum-steps", type=int, default=30,
                   help="steps of that accumulation run (each costs N_max single-GPU steps), compared with the "
                        "N_max run's first steps")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"))
    p.add_argument("train_flags", nargs="*", help="more efla train flags, after --")
    args = p.parse_args(argv)
    if args.gpus[0] != 1:
        raise ValueError(f"--gpus must start with 1, the baseline of the efficiency (got {args.gpus})")
    return args


def run(args: argparse.Namespace, world: int, grad_accum: int, out_dir: Path, steps: int) -> list[dict]:
    """One training run of `steps` steps on `world` processes; returns its metrics records."""
    train = ["-m", "efla", "train", "--model", args.preset, "--tokenizer", args.tokenizer, "--data", *args.data,
             "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--grad-accum",
             str(grad_accum), "--max-steps", str(steps), "--strategy", args.strategy, "--out-dir", str(out_dir),
             "--cache-dir", str(args.out / "token_cache"), "--save-every", str(10**9), "--log-every", "1",
             *args.train_flags]
    command = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
                                 if world > 1 else []), *train]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "log.txt").open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), check=True)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict], world: int, skip: int) -> dict:
    timed = [r["tokens_per_s"] for r in records if r["step"] > skip] or [r["tokens_per_s"] for r in records]
    tokens_per_s = statistics.median(timed)
    return {"gpus": world, "tokens_per_s": tokens_per_s, "per_gpu": tokens_per_s / world,
            "peak_gib": max((r.get("peak_gib", float("nan")) for r in records), default=float("nan")),
            "losses": [r["loss"] for r in records]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in args.gpus:
        rows.append(summary(run(args, world, 1, args.out / f"n{world}", args.steps), world, args.skip))
        base = rows[0]["tokens_per_s"]
        rows[-1]["efficiency"] = rows[-1]["tokens_per_s"] / (world * base)
        print(f"N={world}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, efficiency {rows[-1]['efficiency']:.3f}",
              flush=True)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": rows}
    lines = [f"{args.preset}, {args.strategy}, {args.micro_batch_size} x {args.seq_len} tokens per GPU per step, "
             f"{args.steps} steps (tokens/s: median after step {args.skip})", "",
             "| GPUs | tokens/s | per GPU | weak-scaling efficiency | peak GiB (rank 0) |", "|---|---|---|---|---|"]
    lines += [f"| {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['per_gpu']:,.0f} | {r['efficiency']:.3f} | "
              f"{r['peak_gib']:.1f} |" for r in rows]
    largest = args.gpus[-1]
    if args.same_global_batch and largest > 1:
        steps = min(args.accum_steps, args.steps)
        single = summary(run(args, 1, largest, args.out / f"n1_accum{largest}", steps), 1, args.skip)
        gap = max(abs(a - b) for a, b in zip(single["losses"], rows[-1]["losses"][:steps], strict=True))
        report["same_global_batch"] = {"accumulation": largest, "losses": single["losses"], "max_abs_diff": gap}
        lines += ["", f"1 process with {largest}-fold accumulation vs {largest} GPUs (same global batch and rows): "
                      f"largest loss difference over the first {steps} steps {gap:.2e}"]
    (args.out / "scaling.json").write_text(json.dumps(report, indent=1))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, report)


def plot(args: argparse.Namespace, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in report["runs"]:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1, label=f"{r['gpus']} GPU(s)")
    if "same_global_batch" in report:
        accum = report["same_global_batch"]
        ax.plot(range(1, len(accum["losses"]) + 1), accum["losses"], "k--", lw=1,
                label=f"1 GPU, {accum['accumulation']}-fold accumulation")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "loss_curves.png", dpi=130)


if __name__ == "__main__":
    main()
