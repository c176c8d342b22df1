"""Training throughput (forward + backward, tokens/s) of an EFLA model preset: attn_mode "efla" vs "delta", and fla's
DeltaNet of the same shape when fla is installed. Median over timed steps, after warm-up; no optimizer step (it costs
the same for every model). Mixed precision: float32 weights, bfloat16 autocast.

    python benchmarks/model_throughput.py                                       # 340M, seq 2048, batch 8, GPU
    python benchmarks/model_throughput.py --preset tiny --seq-len 128 --steps 2 --warmup 1   # CPU smoke run
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


def fla_deltanet(config: EFLAConfig) -> nn.Module:
    """fla's DeltaNetForCausalLM with the same sizes as ``config`` (fla's own fused kernels and loss left on)."""
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    return DeltaNetForCausalLM(DeltaNetConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size, conv_size=config.conv_size,
        use_short_conv=config.use_short_conv, use_gate=config.use_output_gate, norm_eps=config.rms_norm_eps,
    ))


def step_seconds(
    model: nn.Module, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device
) -> list[float]:
    """Wall time of each timed forward + backward step on random tokens."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="340M", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, allocator)")
    parser.add_argument("--backend", default="auto", help="efla_attention backend of the EFLA models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    models: dict[str, Callable[[], nn.Module]] = {
        f"EFLA {mode}": lambda mode=mode: EFLAForCausalLM(preset_config(args.preset, attn_mode=mode,
                                                                        attn_backend=args.backend))
        for mode in ("efla", "delta")
    }
    # fla-core ships only the kernels; the models come with the flash-linear-attention package
    if importlib.util.find_spec("fla") is not None and importlib.util.find_spec("fla.models") is not None:
        models["fla DeltaNet"] = lambda: fla_deltanet(preset_config(args.preset))

    tokens = args.batch_size * args.seq_len
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"preset {args.preset}, batch {args.batch_size} x seq {args.seq_len} = {tokens} tokens/step, bf16 autocast, "
          f"{where}, median of {args.steps} steps after {args.warmup} warm-up")
    rows = []  # (name, params, median seconds, peak GiB)
    for name, build in models.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(step_seconds(model, args.batch_size, args.seq_len, args.steps, args.warmup,
                                                 device))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, model.num_parameters(), seconds, peak))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    delta_seconds = next(seconds for name, _, seconds, _ in rows if name == "EFLA delta")
    print(f"{'model':<14} {'params':>14} {'step ms':>10} {'tokens/s':>12} {'vs delta':>9} {'peak GiB':>9}")
    for name, params, seconds, peak in rows:
        print(f"{name:<14} {params:>14,} {seconds * 1e3:>10.1f} {tokens / seconds:>12,.0f} "
              f"{delta_seconds / seconds:>9.3f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
