"""efla convert: a fla DeltaNet (or Gated DeltaNet) checkpoint to an EFLA one (delta mode, same outputs), or an EFLA
one to fla's."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-fla", type=Path, metavar="DIR",
                           help="fla DeltaNetForCausalLM or GatedDeltaNetForCausalLM checkpoint (config.json + "
                                "safetensors) to convert to EFLA")
    direction.add_argument("--to-fla", type=Path, metavar="DIR",
                           help="EFLA checkpoint (attn_mode 'delta') to convert to fla's DeltaNet layout (Gated "
                                "DeltaNet's with use_decay_gate)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="new or empty directory for the converted checkpoint")
    parser.add_argument("--attn-mode", choices=("delta", "efla"), default="delta",
                        help="with --from-fla: 'delta' keeps DeltaNet's outputs, 'efla' runs its weights with the "
                             "exact step (default: delta)")


def run(args: argparse.Namespace) -> None:
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        _usage_error(f"--out {args.out} exists and is not an empty directory: choose a new one")
    if args.to_fla is not None and args.attn_mode != "delta":
        _usage_error("--attn-mode applies to --from-fla only")
    source = args.from_fla if args.from_fla is not None else args.to_fla
    config_file = source / "config.json"
    if not config_file.is_file():
        _usage_error(f"{source} is not a checkpoint directory: it has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if args.to_fla is not None and model_type != "efla":
        _usage_error(f"--to-fla {source} holds model_type {model_type!r}, not an EFLA checkpoint ('efla')")

    from efla.models import EFLAConfig, EFLAForCausalLM
    from efla.models.convert import config_to_fla, from_fla_deltanet, save_fla_deltanet

    try:
        if args.from_fla is not None:
            from_fla_deltanet(source, args.attn_mode).save_pretrained(args.out)
        else:
            config_to_fla(EFLAConfig.from_pretrained(source))  # refuse what fla cannot hold before loading weights
            model, info = EFLAForCausalLM.from_pretrained(source, output_loading_info=True)
            if info["missing_keys"] or info["unexpected_keys"]:
                _usage_error(f"{source}: weights do not match its config: missing {sorted(info['missing_keys'])}, "
                             f"unexpected {sorted(info['unexpected_keys'])}")
            save_fla_deltanet(model, args.out)
    except ValueError as error:
        _usage_error(f"{source}: {error}")
    print(f"wrote {args.out}")


def _usage_error(message: str) -> None:
    """Exit with status 2 (bad input), one line on stderr."""
    print(f"efla convert: error: {message}", file=sys.stderr)
    raise SystemExit(2)
