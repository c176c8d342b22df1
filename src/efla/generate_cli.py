"""``efla generate``: continue a prompt with a saved EFLA model (static state, CUDA-graph decoding on a GPU) and
report generated tokens per second."""

from __future__ import annotations

import argparse
import sys
import time

import torch

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
            raise ValueError(f"{name} must be >= {low} (got {value})")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (got {args.top_p})")


def run(args: argparse.Namespace) -> None:
    """Load, generate (after an untimed warm-up run on CUDA: kernel compilation and graph capture), print each row's
    text and the speed."""
    try:
        _check(args)
    except ValueError as error:
        print(f"efla generate: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import efla.models  # noqa: F401  (registers model_type "efla" with the Auto classes)
    from efla.eval.loading import check_checkpoint, tokenizer_folder
    from efla.models.generation import generate

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        folder = check_checkpoint(args.model)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(folder, args.tokenizer)), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise SystemExit(f"efla generate: error: {error}") from error
    model = model.to(device).eval()
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if prompt.shape[1] == 0:
        raise SystemExit("efla generate: error: --prompt encodes to no tokens; give some text")
    ids = prompt.expand(args.batch_size, -1).contiguous()
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
    new = out[:, ids.shape[1]:]
    for row, tokens in enumerate(new):
        prefix = f"[{row}] " if args.batch_size > 1 else ""
        print(prefix + args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    count = new.numel()
    print(f"{count} tokens ({args.batch_size} x {new.shape[1]}) in {seconds:.3f} s, prompt of {ids.shape[1]} tokens "
          f"included: {count / seconds:.1f} tokens/s ({device.type}, {str(dtype).removeprefix('torch.')})")
