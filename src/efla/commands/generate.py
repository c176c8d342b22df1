"""``efla generate``: continue a prompt with a saved EFLA model (static state, CUDA-graph decoding on a GPU) and
report generated tokens per second."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from efla.commands import CommandError, missing_extra
from efla.device import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``efla generate --model PATH --prompt TEXT [--max-new-tokens N] [--batch-size B] [--temperature T]``."""
    parser.add_argument("--model", required=True, help="folder of a saved model (save_pretrained / efla train)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--tokenizer", help="tokenizer folder, when the model folder holds none")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument("--batch-size", type=int, default=1, help="rows generated at once from the prompt (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens holding probability p")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA (for comparison)")


def _check(args: argparse.Namespace) -> None:
    for name, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise CommandError(f"{name} must be >= {low} (got {value})")
    if args.temperature < 0:
        raise CommandError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.top_k is not None and args.top_k < 1:
        raise CommandError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1] (got {args.top_p})")


def run(args: argparse.Namespace) -> None:
    """Load, generate (after an untimed warm-up run on CUDA: kernel compilation and graph capture), print the prompt,
    each row's continuation and the speed. Every bad argument or input is a usage error (exit 2) before the weights
    load."""
    _check(args)
    try:
        from efla.eval.loading import load_matching_tokenizer, load_model
        from efla.models.generation import generate

        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = load_matching_tokenizer(args.model, args.tokenizer)
        prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
        if prompt.shape[1] == 0:
            raise CommandError("--prompt encodes to no tokens; give some text")
        model = load_model(args.model, device, dtype)
    except ModuleNotFoundError as error:
        raise missing_extra(error, "hf") from error
    except (ValueError, OSError) as error:
        raise CommandError(str(error).splitlines()[0]) from error
    ids = prompt.to(device).expand(args.batch_size, -1).contiguous()
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   use_cuda_graph=False if args.no_cuda_graph else None)
    if device.type == "cuda":
        generate(model, ids, **{**options, "max_new_tokens": min(args.max_new_tokens, 4)})
        torch.cuda.synchronize(device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = generate(model, ids, **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(f"prompt: {tokenizer.decode(ids[0], skip_special_tokens=True)}")
    for row, tokens in enumerate(out):
        label = f"continuation [{row}]" if args.batch_size > 1 else "continuation"
        print(f"{label}: {continuation_text(tokenizer, tokens, ids.shape[1])}")
    new = out[:, ids.shape[1]:]
    count = new.numel()
    print(f"{count} tokens ({args.batch_size} x {new.shape[1]}) in {seconds:.3f} s, prompt of {ids.shape[1]} tokens "
          f"included: {count / seconds:.1f} tokens/s ({device.type}, {str(dtype).removeprefix('torch.')})")


def continuation_text(tokenizer: Any, tokens: torch.Tensor, prompt_length: int) -> str:
    """The text the tokens after the first ``prompt_length`` add to the prompt: the whole row decoded at once, less
    the prompt's text, so that a word or a character split across the boundary comes out whole (the new tokens
    decoded alone when the prompt's text is not a prefix of the row's)."""
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    prompt = tokenizer.decode(tokens[:prompt_length], skip_special_tokens=True)
    if whole.startswith(prompt):
        return whole[len(prompt):]
    return tokenizer.decode(tokens[prompt_length:], skip_special_tokens=True)
