"""Training throughput and memory of the EFLA language model against fla's DeltaNet model, side by side in one run.

Each row is one model variant at one batch x length and one precision: forward + backward of the causal-LM loss
(no optimizer step, which costs the same for every model), median step time after warm-up, tokens/s and peak GPU
memory. Variants: ``efla`` / ``delta`` (our model in each attn_mode, eager), ``efla+compile`` / ``delta+compile``
(each block torch.compile'd, as ``efla train`` does), ``fla`` (fla's DeltaNetForCausalLM of the same sizes, its
fused kernels and loss left at their defaults). Precisions: ``bf16`` (bfloat16 weights, what a model loaded in bf16
runs) and ``amp`` (float32 weights, bfloat16 autocast, what the trainer runs).

    python benchmarks/model_throughput.py                                  # the issue's table, 340M on one GPU
    python benchmarks/model_throughput.py --context-sweep                  # + longest context at batch 1
    python benchmarks/model_throughput.py --shapes 8x2048 --variants efla fla --precisions bf16 amp
    python benchmarks/model_throughput.py --preset tiny --shapes 2x64 --variants efla delta --steps 2 --warmup 1 \
        --device cpu                                                       # CPU smoke run

--context-sweep runs batch 1 at 16k, 32k, ... tokens, doubling until a variant runs out of memory, for each of
--sweep-variants, and reports each one's longest context. --packed-docs MEAN also times our variants on one packed row
of documents (the layout ``efla train`` feeds them). --activation-checkpointing none|selective|full applies that policy
to our models, as ``efla train`` does.
--decay-gate times the gated forms: our variants with ``use_decay_gate`` (delta: Gated DeltaNet, efla: gated EFLA)
and ``fla`` as fla's GatedDeltaNetForCausalLM of the same sizes (one head_dim = hidden / heads, expand_v = 1).
Every row is appended to --out (JSON lines; default: a new dated file in benchmarks/results/) as it finishes, so a
run cut short keeps its numbers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fla_guard import time_fla_gated_backward_anyway
from results_io import ResultsWriter
from torch import nn

from efla.models import PRESETS, EFLAForCausalLM, preset_config
from efla.models.convert import fla_model_like
from efla.train.profiling import device_profile, operator_table

VARIANTS = ("efla", "delta", "efla+compile", "delta+compile", "fla")
SHAPES = ("8x2048", "16x2048", "1x32768", "2x32768")


def build(variant: str, preset: str, overrides: dict, checkpointing: str | None = None) -> nn.Module:
    """The model of one variant (see the module docstring), on the CPU in float32; ours with the activation
    checkpointing policy ``checkpointing`` (none | selective | full) if given."""
    if variant == "fla":
        return fla_model_like(preset_config(preset, use_decay_gate=bool(overrides.get("use_decay_gate"))))
    mode, _, compiled = variant.partition("+")
    model = EFLAForCausalLM(preset_config(preset, attn_mode=mode, **overrides))
    if checkpointing not in (None, "none"):
        model.activation_checkpointing_enable({"policy": checkpointing})
    if compiled:
        for block in model.model.layers:
            block.compile()
    return model


def packed_documents(batch: int, seq_len: int, mean_length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of ``batch`` rows of ``seq_len`` tokens flattened into one row: every row end, and inside the rows
    document starts whose gaps are exponentially distributed with mean ``mean_length`` (seeded)."""
    g = torch.Generator().manual_seed(0)
    starts = []
    for row in range(batch):
        position = 0
        while position < seq_len:
            starts.append(row * seq_len + position)
            gap = torch.empty(1).exponential_(1 / mean_length, generator=g).item()
            position += max(1, round(gap))
    return torch.tensor([*starts, batch * seq_len], dtype=torch.int32, device=device)


def train_step(model: nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None, amp: bool) -> None:
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_seconds(model: nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None, amp: bool, steps: int,
                 warmup: int) -> list[float]:
    """Wall time of each timed forward + backward step."""
    cuda = ids.device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, ids, cu_seqlens, amp)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(make: Callable[[], nn.Module], batch: int, length: int, precision: str, packed: int, args) -> dict:
    """One row: build the model, time it, free it. Out of memory is a result (``"oom": true``), not an error."""
    device = torch.device(args.device)
    row = {"batch": batch, "length": length, "precision": precision, "packed_docs": packed}
    model = None
    try:
        torch.manual_seed(0)
        model = make().to(device, torch.bfloat16 if precision == "bf16" else torch.float32).train()
        ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
        cu = None
        if packed:
            cu, ids = packed_documents(batch, length, packed, device), ids.reshape(1, -1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(step_seconds(model, ids, cu, precision == "amp", args.steps, args.warmup))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row.update(params=model.num_parameters(), ms=seconds * 1e3, tokens_per_s=batch * length / seconds,
                   peak_gib=peak, oom=False)
        if args.profile:
            with device_profile(device) as prof:
                train_step(model, ids, cu, precision == "amp")
            print(operator_table(prof, device, 15))
    except torch.OutOfMemoryError:
        row.update(oom=True)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def report(name: str, row: dict, writer: ResultsWriter) -> None:
    row = writer.write(variant=name, **row)
    shape = f"{row['batch']}x{row['length']}" + (f" packed({row['packed_docs']})" if row["packed_docs"] else "")
    if row["oom"]:
        print(f"{name:<14} {shape:<22} {row['precision']:<5} out of memory", flush=True)
        return
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
    print(f"{name:<14} {shape:<22} {row['precision']:<5} {row['ms']:>9.1f} ms {row['tokens_per_s'] / 1e3:>8.1f}k "
          f"tokens/s  peak {peak} GiB", flush=True)


def summary(rows: list[dict]) -> None:
    """Per shape and precision: each variant's tokens/s and memory relative to fla's row of the same shape."""
    print("\n| B x T | precision | variant | tokens/s (k) | peak GiB | speed vs fla | memory vs fla |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["variant"] == "fla" and not r["oom"] and r["batch"] == row["batch"]
                     and r["length"] == row["length"] and r["precision"] == row["precision"]
                     and not row["packed_docs"]), None)
        shape = f"{row['batch']}x{row['length']}" + (" packed" if row["packed_docs"] else "")
        if row["oom"]:
            print(f"| {shape} | {row['precision']} | {row['variant']} | OOM | | | |")
            continue
        peak = row["peak_gib"] or float("nan")
        speed = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else ""
        memory = f"{peak / base['peak_gib']:.2f}" if base and base["peak_gib"] else ""
        print(f"| {shape} | {row['precision']} | {row['variant']} | {row['tokens_per_s'] / 1e3:.1f} | {peak:.1f} "
              f"| {speed} | {memory} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default="340M", choices=sorted(PRESETS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="BxT")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=("bf16", "amp"))
    parser.add_argument("--context-sweep", action="store_true", help="batch 1 at 16k, 32k, ... until out of memory")
    parser.add_argument("--sweep-variants", nargs="+", default=["efla", "efla+compile", "fla"], choices=VARIANTS)
    parser.add_argument("--sweep-max", type=int, default=1 << 20, help="longest context the sweep tries")
    parser.add_argument("--packed-docs", type=int, default=0, metavar="MEAN",
                        help="also time our variants on packed documents of this mean length (0: off)")
    parser.add_argument("--activation-checkpointing", default=None, choices=["none", "selective", "full"],
                        help="the policy applied to our models")
    parser.add_argument("--decay-gate", action="store_true",
                        help="the gated forms: use_decay_gate in ours, fla's Gated DeltaNet as 'fla'")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="print each row's top operators")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    args = parser.parse_args(argv)
    overrides, policy = {}, args.activation_checkpointing
    if args.decay_gate:
        overrides["use_decay_gate"] = True
        if "fla" in args.variants and args.device.startswith("cuda"):
            time_fla_gated_backward_anyway()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    writer = ResultsWriter("model_throughput", where, args.out, preset=args.preset,
                           decay_gate=args.decay_gate, activation_checkpointing=args.activation_checkpointing or "none")
    print(f"preset {args.preset}, {where}, torch {torch.__version__}, {datetime.date.today()}; forward+backward of "
          f"the loss, median of {args.steps} steps after {args.warmup} warm-up", flush=True)

    rows = []
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.lower().split("x"))
        for precision in args.precisions:
            for variant in args.variants:
                row = measure(lambda v=variant: build(v, args.preset, overrides, policy), batch, length, precision, 0,
                              args)
                report(variant, row, writer)
                rows.append({"variant": variant, **row})
                if args.packed_docs and variant != "fla":
                    row = measure(lambda v=variant: build(v, args.preset, overrides, policy), batch, length, precision,
                                  args.packed_docs, args)
                    report(variant, row, writer)
                    rows.append({"variant": variant, **row})
    if args.context_sweep:
        for variant in args.sweep_variants:
            length, longest = 16384, None
            while length <= args.sweep_max:
                row = measure(lambda v=variant: build(v, args.preset, overrides, policy), 1, length, "bf16", 0, args)
                report(variant, row, writer)
                rows.append({"variant": variant, **row})
                if row["oom"]:
                    break
                longest, length = length, 2 * length
            print(f"{variant}: longest context at batch 1 (bf16): {longest}", flush=True)
    summary(rows)


if __name__ == "__main__":
    main()
