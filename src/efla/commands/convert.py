"""``efla convert``: a fla DeltaNet (or Gated DeltaNet) checkpoint to an EFLA one (delta mode, same outputs), or an EFLA
one to fla's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from efla.commands import CommandError, missing_extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``efla convert --from-fla DIR | --to-fla DIR --out DIR [--attn-mode delta|efla]``."""
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
    """Check the folders, convert, save; every bad input is a usage error (exit 2) before anything is written."""
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CommandError(f"--out {args.out} exists and is not an empty directory: choose a new one")
    if args.to_fla is not None and args.attn_mode != "delta":
        raise CommandError("--attn-mode applies to --from-fla only")
    source = args.from_fla if args.from_fla is not None else args.to_fla
    config_file = source / "config.json"
    if not config_file.is_file():
        raise CommandError(f"{source} is not a checkpoint directory: it has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise CommandError(f"{config_file} is not a readable JSON config ({error})") from error
    if args.to_fla is not None and model_type != "efla":
        raise CommandError(f"--to-fla {source} holds model_type {model_type!r}, not an EFLA checkpoint ('efla')")

    try:
        from efla.models import EFLAConfig, EFLAForCausalLM
        from efla.models.convert import config_to_fla, from_fla_deltanet, save_fla_deltanet
    except ModuleNotFoundError as error:
        raise missing_extra(error, "hf") from error

    try:
        if args.from_fla is not None:
            from_fla_deltanet(source, args.attn_mode).save_pretrained(args.out)
        else:
            config_to_fla(EFLAConfig.from_pretrained(source))  # refuse what fla cannot hold before loading weights
            model, info = EFLAForCausalLM.from_pretrained(source, output_loading_info=True)
            if info["missing_keys"] or info["unexpected_keys"]:
                raise CommandError(f"{source}: weights do not match its config: missing "
                                   f"{sorted(info['missing_keys'])}, unexpected {sorted(info['unexpected_keys'])}")
            save_fla_deltanet(model, args.out)
    except ValueError as error:
        raise CommandError(f"{source}: {error}") from error
    print(f"wrote {args.out}")
