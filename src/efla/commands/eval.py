"""``efla eval``: perplexity of a checkpoint on held-out text (ppl), or lm-evaluation-harness tasks (harness).

    efla eval ppl --model runs/NAME/model --files data/corpus/test.jsonl [--context 2048 --stride 512]
    efla eval harness --model runs/NAME/model --tasks lambada_openai,piqa [--limit 100 --num-fewshot 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from efla.commands import CommandError, missing_extra
from efla.commands.options import check_new_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``efla eval ppl ...`` and ``efla eval harness ...``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ppl = actions.add_parser("ppl", help="perplexity and bits per byte on local files or a datasets split",
                             allow_abbrev=False)
    ppl.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    source = ppl.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", nargs="+",
                        help=".jsonl (one document a line) or text files (one document each), optionally .gz")
    source.add_argument("--dataset", help="a Hugging Face datasets name or local folder")
    ppl.add_argument("--dataset-config", help="the dataset's configuration, e.g. wikitext-2-raw-v1")
    ppl.add_argument("--split", default="test", help="dataset split (default test)")
    ppl.add_argument("--text-field", default="text", help="jsonl key / dataset column holding the text")
    ppl.add_argument("--tokenizer", help="tokenizer folder, when the checkpoint folder has none")
    ppl.add_argument("--context", type=int, help="tokens per window (default: the seq_len the model was trained at, "
                                                 "from the run's train_config.json; else max_position_embeddings)")
    ppl.add_argument("--stride", type=int, help="tokens between windows (default: context, i.e. disjoint chunks)")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    ppl.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    ppl.add_argument("--fp32", action="store_true", help="on CUDA, float32 instead of bfloat16 autocast")
    ppl.add_argument("--output", type=Path, help="also write the numbers to this JSON file (a new one)")
    ppl.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    harness = actions.add_parser("harness", help="lm-evaluation-harness tasks (pip install efla[eval])",
                                 allow_abbrev=False)
    harness.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    harness.add_argument("--tasks", required=True, nargs="+", help="task names, comma or space separated")
    harness.add_argument("--tokenizer", help="tokenizer folder, when the checkpoint folder has none")
    harness.add_argument("--batch-size", type=_batch_size, default=1, help="an int or 'auto' (default 1)")
    harness.add_argument("--limit", type=float, help="documents per task (a fraction when < 1)")
    harness.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    harness.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    harness.add_argument("--include-path", nargs="+", default=[], help="more folders of task YAMLs")
    harness.add_argument("--no-builtin-tasks", action="store_true",
                         help="index only efla's and --include-path tasks (skips the harness's own; faster start)")
    harness.add_argument("--output", type=Path, help="also write the results to this JSON file (a new one)")
    harness.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def run(args: argparse.Namespace) -> None:
    """Run the action; bad input (a missing folder or file, malformed text, an unusable device) is a one-line usage
    error, a missing optional package names the extra to install."""
    try:
        check_new_file(args.output, args.overwrite)
        if args.action == "ppl":
            _ppl(args)
        else:
            _harness(args)
    except ModuleNotFoundError as error:
        raise missing_extra(error, "eval" if args.action == "harness" else "hf") from error
    except (ValueError, OSError) as error:
        raise CommandError(str(error).splitlines()[0] if str(error) else repr(error)) from error


def _ppl(args: argparse.Namespace) -> None:
    from efla.device import resolve_device
    from efla.eval.loading import dataset_texts, load_matching_tokenizer, load_model, read_texts, trained_context
    from efla.eval.perplexity import perplexity

    device = resolve_device(args.device)  # the checks first, then the text, then the weights
    tokenizer = load_matching_tokenizer(args.model, args.tokenizer)
    if args.files:
        texts, source = read_texts(args.files, args.text_field), {"files": args.files}
    else:
        texts = dataset_texts(args.dataset, args.split, args.dataset_config, args.text_field)
        source = {"dataset": args.dataset, "config": args.dataset_config, "split": args.split}
    model = load_model(args.model, device)
    context = args.context if args.context is not None else trained_context(args.model)
    result = perplexity(model, tokenizer, texts, context=context, stride=args.stride,
                        batch_size=args.batch_size, bf16_autocast=not args.fp32, progress=True)
    print(f"perplexity {result.perplexity:.4f}  bits/byte {result.bits_per_byte:.4f}  ({result.tokens} tokens, "
          f"{result.bytes} bytes, {result.documents} documents, context {result.context}, stride {result.stride})")
    _write_json(args.output, {"model": args.model, **source, **result.to_dict()})


def _harness(args: argparse.Namespace) -> None:
    from lm_eval.utils import make_table

    from efla.eval.harness import evaluate_tasks

    tasks = [task for item in args.tasks for task in item.split(",") if task]
    results = evaluate_tasks(args.model, tasks, tokenizer=args.tokenizer, batch_size=args.batch_size, limit=args.limit,
                             num_fewshot=args.num_fewshot, device=args.device, include_path=args.include_path,
                             builtin_tasks=not args.no_builtin_tasks)
    print(make_table(results))
    _write_json(args.output, {"model": args.model, **{key: results[key] for key in
                                                       ("results", "versions", "n-shot", "config") if key in results}})


def _batch_size(text: str) -> int | str:
    """An int, or the harness's "auto" / "auto:N" (find the largest batch that fits)."""
    return text if text.startswith("auto") else int(text)


def _write_json(path: Path | None, record: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
