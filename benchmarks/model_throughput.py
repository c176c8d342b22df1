"""Training throughput (forward + backward, tokens/s) of an EFLA model preset: attn_mode "efla" vs "delta", and fla's
DeltaNet of the same shape when fla is installed. Median over timed steps, after warm-up; no optimizer step (it costs
the same for every model). Mixed precision: float32 weights, bfloat16 autocast.

    python benchmarks/model_throughput.py                                       # 340M, seq 2048, batch 8, GPU
    python benchmarks/model_throughput.py --packed-docs 1500 --profile          # also packed documents; op table
    python benchmarks/model_throughput.py --preset tiny --seq-len 128 --steps 2 --warmup 1   # CPU smoke run

--packed-docs MEAN also times the EFLA models on the layout ``efla train`` feeds them: the batch's rows flattened into
one packed row cut into documents (lengths drawn from an exponential distribution of that mean, plus the row ends) and
passed as cu_seqlens. --profile prints the operators that take the most time in one step of each EFLA-mode model.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from efla.models import PRESETS, EFLAConfig, EFLAForCausalLM, preset_config
from efla.train.profiling import device_profile, operator_table


def fla_deltanet(config: EFLAConfig) -> nn.Module:
    """fla's DeltaNetForCausalLM with the same sizes as ``config`` (fla's own fused kernels and loss left on)."""
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    return DeltaNetForCausalLM(DeltaNetConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size, conv_size=config.conv_size,
        use_short_conv=config.use_short_conv, use_gate=config.use_output_gate, norm_eps=config.rms_norm_eps,
    ))


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


def train_step(model: nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False, cu_seqlens=cu_seqlens).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_seconds(model: nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None, steps: int, warmup: int,
                 device: torch.device) -> list[float]:
    """Wall time of each timed forward + backward step on the token ids [B, T] (with cu_seqlens: [1, B*T])."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, ids, cu_seqlens, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def print_profile(name: str, model: nn.Module, ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  device: torch.device) -> None:
    """The operators taking the most (device, else CPU) time in one step."""
    with device_profile(device) as prof:
        train_step(model, ids, cu_seqlens, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"\n{name}: one step, {operator_table(prof, device, 15)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="340M", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, allocator)")
    parser.add_argument("--backend", default="auto", help="efla_attention backend of the EFLA models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--packed-docs", type=int, default=0, metavar="MEAN",
                        help="also time the EFLA models on packed documents of this mean length (0: off)")
    parser.add_argument("--profile", action="store_true", help="print each EFLA-mode model's top operators")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    def efla_model(mode: str) -> nn.Module:
        return EFLAForCausalLM(preset_config(args.preset, attn_mode=mode, attn_backend=args.backend))

    ids = torch.randint(0, preset_config(args.preset).vocab_size, (args.batch_size, args.seq_len), device=device)
    runs: dict[str, tuple[Callable[[], nn.Module], torch.Tensor | None]] = {
        f"EFLA {mode}": (lambda mode=mode: efla_model(mode), None) for mode in ("efla", "delta")}
    if args.packed_docs:
        cu_seqlens = packed_documents(args.batch_size, args.seq_len, args.packed_docs, device)
        runs.update({f"EFLA {mode} packed": (lambda mode=mode: efla_model(mode), cu_seqlens)
                     for mode in ("efla", "delta")})
    # fla-core ships only the kernels; the models come with the flash-linear-attention package
    if importlib.util.find_spec("fla") is not None and importlib.util.find_spec("fla.models") is not None:
        runs["fla DeltaNet"] = (lambda: fla_deltanet(preset_config(args.preset)), None)

    tokens = args.batch_size * args.seq_len
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"preset {args.preset}, batch {args.batch_size} x seq {args.seq_len} = {tokens} tokens/step, bf16 autocast, "
          f"{where}, median of {args.steps} steps after {args.warmup} warm-up"
          + (f"; packed: {len(cu_seqlens) - 1} documents" if args.packed_docs else ""))
    rows = []  # (name, params, median seconds, peak GiB)
    for name, (build, cu) in runs.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch_ids = ids if cu is None else ids.reshape(1, -1)
        seconds = statistics.median(step_seconds(model, batch_ids, cu, args.steps, args.warmup, device))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, model.num_parameters(), seconds, peak))
        print(f"{name}: {seconds * 1e3:.1f} ms/step, {tokens / seconds:,.0f} tokens/s, peak {peak:.1f} GiB",
              flush=True)  # as each finishes, so a run cut short keeps its numbers
        if args.profile and name.startswith("EFLA efla"):
            print_profile(name, model, batch_ids, cu, device)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    delta_seconds = next(seconds for name, _, seconds, _ in rows if name == "EFLA delta")
    print(f"{'model':<20} {'params':>14} {'step ms':>10} {'tokens/s':>12} {'vs delta':>9} {'peak GiB':>9}")
    for name, params, seconds, peak in rows:
        print(f"{name:<20} {params:>14,} {seconds * 1e3:>10.1f} {tokens / seconds:>12,.0f} "
              f"{delta_seconds / seconds:>9.3f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
