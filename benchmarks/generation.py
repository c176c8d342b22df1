"""Generation speed: whole generate calls and milliseconds per generated token of an EFLA preset (random weights)
against fla's DeltaNet and a Llama of the same size (SDPA), at several batch sizes and prompt lengths, in one run.

    python benchmarks/generation.py --out generation.jsonl          # 340M, bf16, batch 1/16/64, prompts 128/2048
    python benchmarks/generation.py --preset tiny --device cpu --batch-sizes 1 2 --prompt-lens 8 \\
        --new-tokens 4 --repeats 1                                      # CPU smoke run (float32)

Models: "efla plain" (``model.generate(ids, max_new_tokens=n)`` as a user types it: on CUDA the model's kept static
state and captured decode graph), "efla eager" (transformers' generate with its dynamic cache passed explicitly: the
path the plain call took before), "efla graph" (``efla.models.generation.generate``: static state, CUDA-graph decode
steps, no per-token host sync; eager static steps on the CPU), "efla graph compiled" (only with --models: the step
compiled by torch.compile's inductor before the capture), "fla DeltaNet" (flash-linear-attention's
DeltaNetForCausalLM with the same sizes, its plain generate; skipped with a note when not importable or not on CUDA)
and "llama sdpa" (LlamaForCausalLM: same hidden size, layers, heads and MLP width: 373,867,520 parameters against
EFLA 340M's 374,362,112; counts are printed per row).

    python benchmarks/generation.py --models "efla plain" "efla graph compiled" --out generation.jsonl
    python benchmarks/generation.py --profile-step --batch-sizes 1       # the kernels of one decode step, by name

Every model is built first; then for each batch size and prompt length, in the order given, every model is measured
in turn, so a run cut short keeps side-by-side rows of the shapes it reached. Per (model, batch, prompt) the prompt is
random tokens without padding; greedy decoding, no eos. Per row:

- first call ms: the first generate call of N new tokens at this shape (kernel compilation at the first shape, graph
  capture at each new batch size: what the first call pays);
- call ms: the median wall time t(N) of a whole call of N new tokens after it, what a user waits for; bar ms: the
  target for it, prefill + N x 1.5 ms;
- ms per generated token = (t(1 + N) - t(1)) / N, the decode steps alone, and the prefill time t(1).

Each row is printed and appended to --out (default: a new dated file in benchmarks/results/) as one JSON line as soon
as it is measured, so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results_io import ResultsWriter
from torch import nn
from transformers import DynamicCache

from efla.models import PRESETS, EFLAConfig, EFLAForCausalLM, preset_config
from efla.models.convert import fla_model_like
from efla.models.generation import decode_step, generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODELS = ("efla plain", "efla eager", "efla graph", "fla DeltaNet", "llama sdpa")
BAR_MS_PER_TOKEN = 1.5  # a whole call of N new tokens should take at most prefill + N x this
OPTIONAL = ("efla graph compiled",)  # only when asked for with --models: compiling costs minutes per batch size
Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids [B, T], new tokens) -> ids [B, T + new]


def llama_sdpa(config: EFLAConfig) -> nn.Module:
    """A LlamaForCausalLM with the hidden size, layers, heads, MLP width and vocabulary of ``config`` (SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False,
        max_position_embeddings=8192, attn_implementation="sdpa",
    ))


def hf_generate(model: nn.Module, dynamic_cache: bool = False) -> Generate:
    """transformers' generate, greedy, exactly ``new`` tokens, as a user calls it (optionally with transformers'
    dynamic cache passed in, the path EFLA's plain call took before it kept a static state)."""

    def run(ids: torch.Tensor, new: int) -> torch.Tensor:
        extra = {"cache": DynamicCache(config=model.config)} if dynamic_cache else {}
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, eos_token_id=None, pad_token_id=0, **extra)

    return run


def unavailable(name: str, device: torch.device) -> str | None:
    """Why a model cannot run here, or None."""
    if name == "fla DeltaNet":
        if device.type != "cuda":
            return "fla's kernels need CUDA"
        if importlib.util.find_spec("fla") is None or importlib.util.find_spec("fla.models") is None:
            return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    return None


def build(name: str, config: EFLAConfig) -> tuple[nn.Module, Callable[[nn.Module], Generate]]:
    """The model (random weights) and how to generate with it."""
    if name == "fla DeltaNet":
        return fla_model_like(config), hf_generate
    if name == "llama sdpa":
        return llama_sdpa(config), hf_generate
    model = EFLAForCausalLM(config)
    if name == "efla plain":
        return model, hf_generate
    if name == "efla eager":
        return model, lambda m: hf_generate(m, dynamic_cache=True)
    backend = "inductor" if name == "efla graph compiled" else None
    return model, lambda m: lambda ids, new: generate(m, ids, max_new_tokens=new, compile_backend=backend)


def seconds(run: Generate, ids: torch.Tensor, new: int, device: torch.device) -> float:
    """Wall time of one call producing exactly ``new`` tokens, the device's work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run(ids, new)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {new}")
    return time.perf_counter() - start


def measure(run: Generate, batch: int, prompt: int, vocab: int, args: argparse.Namespace,
            device: torch.device) -> dict[str, float]:
    """The first call's, a later whole call's, the prefill's and one decode step's milliseconds at one shape."""
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    new = args.new_tokens

    def median_ms(tokens: int) -> float:
        return statistics.median(seconds(run, ids, tokens, device) for _ in range(args.repeats)) * 1e3

    first_call = seconds(run, ids, new, device) * 1e3
    call, prefill, longer = median_ms(new), median_ms(1), median_ms(1 + new)
    return {"first_call_ms": first_call, "call_ms": call, "prefill_ms": prefill,
            "ms_per_token": (longer - prefill) / new, "bar_ms": prefill + new * BAR_MS_PER_TOKEN}


@torch.inference_mode()
def profile_step(model: nn.Module, batch: int, vocab: int, device: torch.device) -> None:
    """Print the kernels that one eager decode step launches (after a 16-token prefill), grouped by name: what a
    CUDA graph of the step replays, and where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    step = decode_step(model, use_cuda_graph=False)
    cache = step.static_cache(batch)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = ids[:, -1:]
    for _ in range(3):  # warm-up: compilation, autotuning
        step(token, cache)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step(token, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA or device.type != "cuda":
            kernels.setdefault(event.name[:90], []).append(event.device_time if device.type == "cuda"
                                                           else event.cpu_time)
    total = sum(len(t) for t in kernels.values())
    busy = sum(sum(t) for t in kernels.values())
    print(f"\nbatch {batch}: one decode step launches {total} kernels, {busy:.0f} us of kernel time")
    for name, times in sorted(kernels.items(), key=lambda item: -sum(item[1]))[:40]:
        print(f"{len(times):>5} x {statistics.median(times):>7.1f} us  {sum(times):>8.1f} us  {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default="340M", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default bfloat16 on CUDA, "
                        "float32 on the CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per timed call (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the median is kept")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + OPTIONAL)
    parser.add_argument("--out", type=Path, help="JSON-lines file the rows are appended to")
    parser.add_argument("--profile-step", action="store_true", help="instead of timing: list the GPU kernels of one "
                        "eager decode step over the static state (count and time per kernel name), per batch size")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes + args.prompt_lens) < 1:
        parser.error("--batch-sizes and --prompt-lens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every model at every batch size and prompt length; print the table; return the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]
    config = preset_config(args.preset)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"preset {args.preset}, {args.dtype}, {where}; whole calls of {args.new_tokens} new tokens; ms per "
          f"generated token = (t(1 + {args.new_tokens}) - t(1)) / {args.new_tokens}; medians of {args.repeats} calls "
          "after the first", flush=True)
    if args.profile_step:
        torch.manual_seed(0)
        model = EFLAForCausalLM(config).to(device=device, dtype=dtype).eval()
        for batch in args.batch_sizes:
            profile_step(model, batch, config.vocab_size, device)
        return []
    runners = {}  # every model is built first, so that each (batch, prompt) is measured for all of them in turn
    for name in args.models:
        reason = unavailable(name, device)
        if reason is not None:
            print(f"{name}: skipped: {reason}", flush=True)
            continue
        torch.manual_seed(0)
        model, generator_of = build(name, config)
        model = model.to(device=device, dtype=dtype).eval()
        runners[name] = (generator_of(model), model.num_parameters())
    writer = ResultsWriter("generation", where, args.out, preset=args.preset, dtype=args.dtype,
                           new_tokens=args.new_tokens)
    rows, failures = [], []
    for batch in args.batch_sizes:  # outer: a run cut short still holds side-by-side rows of its first shapes
        for prompt in args.prompt_lens:
            for name, (run, params) in runners.items():
                try:
                    times = measure(run, batch, prompt, config.vocab_size, args, device)
                except Exception as error:  # one model failing must not lose the other models' rows
                    failures.append(f"{name}, batch {batch}, prompt {prompt}: {type(error).__name__}: {error}")
                    print(f"{failures[-1]} (FAILED)", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                row = writer.write(model=name, params=params, batch=batch, prompt=prompt, **times,
                                   tokens_per_s=batch / times["ms_per_token"] * 1e3)
                rows.append(row)
                print(f"{name}: batch {batch}, prompt {prompt}: call {row['call_ms']:.1f} ms (first "
                      f"{row['first_call_ms']:.1f}, bar {row['bar_ms']:.1f}), {row['ms_per_token']:.2f} ms/token, "
                      f"{row['tokens_per_s']:,.0f} tokens/s, prefill {row['prefill_ms']:.1f} ms", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'model':<20} {'params':>13} {'batch':>6} {'prompt':>7} {'call ms':>9} {'bar ms':>8} "
          f"{'first ms':>9} {'ms/token':>9} {'tokens/s':>10} {'prefill ms':>11}")
    for r in rows:
        print(f"{r['model']:<20} {r['params']:>13,} {r['batch']:>6} {r['prompt']:>7} {r['call_ms']:>9.1f} "
              f"{r['bar_ms']:>8.1f} {r['first_call_ms']:>9.1f} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>10,.0f} "
              f"{r['prefill_ms']:>11.1f}")
    if failures:
        raise SystemExit("failed measurements:\n" + "\n".join(failures))
    return rows


if __name__ == "__main__":
    main()
