"""Ablations of gated EFLA's update: which part of it makes its lead over Gated DeltaNet (EXPERIMENTS.md).

    python scripts/ablate_gated_efla.py --ablation unit-keys --corpus runs/corpus --out runs/ablate/unit-keys

Ablations (each one change to the gated EFLA model, everything else as in efla compare-lm's CPU run):
  eta-is-alpha  the write step is the erase step alpha instead of eta = beta phi(beta ||k||^2 - g), so a strong decay
                no longer shrinks the write
  unit-keys     keys L2-normalised, as Gated DeltaNet's are: ||k||^2 = 1, so the key norm gates nothing and what is
                left of EFLA is its step sizes alpha = 1 - exp(-beta) and eta = beta phi(beta - g)
Trains with ``efla train`` and scores the test split with ``efla eval ppl`` in this process, with the change patched
into efla's PyTorch path (the model runs with attn_backend "torch", whose step sizes and layer this patches; the Triton
kernels are not patched, so a GPU run is as slow as the PyTorch backend). The change is not part of the library,
so the saved model scores as the unablated one anywhere else: the run folder names its ablation (ablation.json), and
a run stopped after training is scored by the same command again, which then trains nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import efla.ops.backends as backends
from efla.cli import main as efla
from efla.layers import attention
from efla.modules.elementwise import l2_normalize

ABLATIONS = ("eta-is-alpha", "unit-keys")


@contextlib.contextmanager
def ablation(name: str) -> Iterator[None]:
    """Patch ``name``'s change into efla's PyTorch path for the duration of the block."""
    if name == "eta-is-alpha":
        original = backends.gated_step_sizes

        def alpha_twice(k, beta, g, mode):
            alpha, eta = original(k, beta, g, mode)
            return alpha, alpha if mode == "efla" else eta

        target, attribute, replacement = backends, "gated_step_sizes", alpha_twice
    elif name == "unit-keys":
        original = attention.EFLAttention._activate

        def unit_keys(self, *args, **kwargs):
            q, k, v = original(self, *args, **kwargs)
            return q, l2_normalize(k), v

        target, attribute, replacement = attention.EFLAttention, "_activate", unit_keys
    else:
        raise ValueError(f"ablation must be one of {ABLATIONS} (got {name!r})")
    setattr(target, attribute, replacement)
    try:
        yield
    finally:
        setattr(target, attribute, original)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--ablation", required=True, choices=ABLATIONS)
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"), help="folder with train.jsonl and test.jsonl")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: CORPUS/tokenizer-32k)")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder (a new one; or one whose training finished, to score it)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=600_000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        if (args.out / "ppl_test.json").exists():
            p.error(f"--out {args.out} holds a finished run; choose a new folder")
        if _recorded_ablation(args.out) != args.ablation or not _trained(args.out):
            p.error(f"--out {args.out} exists and holds no finished training of --ablation {args.ablation}; "
                    "choose a new folder")
    return args


def _trained(out: Path) -> bool:
    """Whether ``efla train`` finished in ``out``: it writes model/train_config.json after the weights, last."""
    return (out / "model" / "train_config.json").is_file()


def _recorded_ablation(out: Path) -> str | None:
    try:
        return json.loads((out / "ablation.json").read_text())["ablation"]
    except (OSError, ValueError, KeyError):
        return None


def main(argv: list[str] | None = None) -> float:
    """Train and score one ablated gated EFLA model; returns its test perplexity."""
    args = parse_args(argv)
    overrides = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "num_heads": args.heads,
                 "attn_mode": "efla", "use_decay_gate": True, "attn_backend": "torch"}
    with ablation(args.ablation):
        if not _trained(args.out):  # parse_args allows an existing --out only after its training
            args.out.mkdir(parents=True)
            (args.out / "ablation.json").write_text(json.dumps({"ablation": args.ablation, "overrides": overrides}))
            efla(["train", "--model", "340M", "--model-overrides", json.dumps(overrides),
                  "--tokenizer", str(args.tokenizer or args.corpus / "tokenizer-32k"),
                  "--data", str(args.corpus / "train.jsonl"), "--seq-len", str(args.seq_len),
                  "--micro-batch-size", str(args.batch), "--max-tokens", str(args.max_tokens), "--lr", str(args.lr),
                  "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), "--out-dir", str(args.out),
                  "--save-every", "100000", "--log-every", "5"])
        output = args.out / "ppl_test.json"
        efla(["eval", "ppl", "--model", str(args.out / "model"), "--files", str(args.corpus / "test.jsonl"),
              "--context", str(args.seq_len), "--output", str(output)])
    perplexity = json.loads(output.read_text())["perplexity"]
    print(f"{args.ablation}: test perplexity {perplexity:.2f}")
    return perplexity


if __name__ == "__main__":
    main()
