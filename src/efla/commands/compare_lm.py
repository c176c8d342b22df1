"""``efla compare-lm``: the language-model comparison, EFLA vs DeltaNet (and their gated forms) trained on the same
corpus for the same tokens at every learning rate and seed of a small sweep; held-out perplexity of each run, its mean
and spread over seeds (``efla.experiments.compare_lm``).

    python scripts/build_corpus.py --out runs/corpus          # once: the Debian documentation corpus
    efla compare-lm --corpus runs/corpus --out runs/compare --gpus 0 0 0 --lrs 2e-3 --seeds 0 1 2
    efla compare-lm ... --modes efla delta gated-efla gated-delta     # with the decay-gated modes

Each run is ``efla train`` then ``efla eval ppl`` on the validation and test splits, one run per entry of --gpus at a
time (repeat an id to share a GPU). Writes results.json, table.md and loss_curves.png to --out after every finished
run; the same command again into the same --out reuses finished runs and reruns the others. A failed run stops none
of the others; the command then exits with 1 naming it. Ctrl-C ends the running runs and exits with 130.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from efla.commands import UNFINISHED, CommandError, missing_extra
from efla.experiments.compare_lm import CompareConfig, RunsFailed, check_config, sweep
from efla.variants import VARIANTS

DEFAULTS = CompareConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's flags; their defaults are CompareConfig's."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = DEFAULTS
    parser.add_argument("--corpus", type=Path, default=d.corpus,
                        help="folder with train/validation/test.jsonl (from scripts/build_corpus.py)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: CORPUS/tokenizer-32k)")
    parser.add_argument("--out", type=Path, default=d.out)
    parser.add_argument("--gpus", nargs="+", default=list(d.gpus), help="CUDA device ids, one concurrent run each")
    parser.add_argument("--lrs", nargs="+", type=float, default=list(d.lrs))
    parser.add_argument("--hidden-size", type=int, default=d.hidden_size)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch", type=int, default=d.batch, help="rows of --seq-len tokens per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum,
                        help="micro-batches per optimiser step (the same step in less memory, e.g. runs sharing a GPU)")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens,
                        help="training tokens per run (default: one epoch)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--modes", nargs="+", default=list(d.modes), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds),
                        help="one run per seed of every (mode, lr)")


def run(args: argparse.Namespace) -> None:
    """Check the settings and the tokenizer, then run the sweep; a failed run is exit code 1."""
    config = CompareConfig(
        corpus=args.corpus, tokenizer=args.tokenizer, out=args.out, gpus=tuple(args.gpus), lrs=tuple(args.lrs),
        hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, seq_len=args.seq_len, batch=args.batch,
        grad_accum=args.grad_accum, max_tokens=args.max_tokens, warmup_steps=args.warmup_steps,
        modes=tuple(args.modes), seeds=tuple(args.seeds))
    try:
        check_config(config)
        from efla.train.tokenizer import load_tokenizer

        # every run's model takes its vocab_size from this tokenizer (efla train's default), so a tokenizer that
        # loads fits every model of the sweep
        load_tokenizer(config.tokenizer)
    except ModuleNotFoundError as error:
        raise missing_extra(error, "hf") from error
    except (ValueError, OSError) as error:
        raise CommandError(str(error).splitlines()[0]) from error
    try:
        sweep(config)
    except RunsFailed as error:
        raise CommandError(str(error), UNFINISHED) from error
