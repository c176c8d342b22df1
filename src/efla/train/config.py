"""``TrainConfig``: every setting of a training run, from a YAML/JSON file and/or command-line flags.

Flags are generated from the dataclass fields (``seq_len`` -> ``--seq-len``); a flag given on the command line
overrides the same key in the file, and the file overrides the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
SCHEDULES = ("cosine", "wsd", "linear")
DEFAULT_SEQ_LEN = 2048  # when the model config names no max_position_embeddings


def _setting(default: Any, help: str) -> Any:
    """A TrainConfig field with an immutable default and its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """One training run. Batch sizes count rows of ``seq_len`` tokens; the global batch per optimiser step is
    micro_batch_size * grad_accum * (world size / context_parallel) rows."""

    # model
    model: str = _setting("340M", "a preset (tiny, 340M, 1.3B), a config.json, or a folder holding one")
    model_overrides: dict[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "model config fields as JSON, e.g. '{\"attn_mode\": \"delta\"}'"})
    # data
    tokenizer: str | None = _setting(None, "folder of a Hugging Face tokenizer (e.g. from `efla tokenizer train`)")
    data: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "files, folders, globs: .txt/.md (a document each), .jsonl, .parquet"})
    dataset: str | None = _setting(None, "a Hugging Face datasets name instead of --data (needs `datasets`)")
    dataset_config: str | None = _setting(None, "the dataset's configuration name")
    dataset_split: str = _setting("train", "the dataset split")
    text_field: str = _setting("text", "the jsonl / parquet / dataset field holding the document text")
    cache_dir: str = _setting("~/.cache/efla/tokens", "where tokenised corpora are cached (memory-mapped)")
    seq_len: int | None = _setting(None, "tokens per row (default: the model's max_position_embeddings, e.g. 2048 "
                                         "for 340M, 512 for tiny)")
    pack_boundaries: bool = _setting(True, "restart the recurrent state at each document (when the model can)")
    # optimisation
    micro_batch_size: int = _setting(8, "rows per forward pass on each rank")
    grad_accum: int = _setting(1, "micro-batches per optimiser step")
    max_steps: int | None = _setting(None, "optimiser steps (or give --max-tokens)")
    max_tokens: int | None = _setting(None, "token budget: steps = max_tokens / tokens per step, rounded up")
    lr: float = _setting(1e-3, "peak learning rate")
    schedule: str = _setting("cosine", "learning-rate schedule after the warmup: cosine (to lr * min_lr_ratio), "
                                       "wsd (warmup-stable-decay) or linear (to 0); transformers' schedules")
    min_lr_ratio: float = _setting(0.1, "the cosine and wsd schedules end at lr * min_lr_ratio")
    decay_ratio: float = _setting(0.1, "wsd: the fraction of the steps, at the end, over which the lr decays")
    warmup_steps: int = _setting(100, "steps of linear warmup")
    weight_decay: float = _setting(0.1, "AdamW weight decay of matrices (not norms or biases)")
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    adam_eps: float = _setting(1e-8, "AdamW epsilon")
    grad_clip: float = _setting(1.0, "max global grad norm; 0: no clipping")
    # system
    strategy: str = _setting("ddp", "ddp | fsdp (FSDP2 fully_shard per block, then the root) under torchrun")
    context_parallel: int = _setting(1, "split each row along T over this many ranks (context parallelism; must "
                                        "divide the world size; EFLA layers only, no softmax attn_layers)")
    precision: str = _setting("bf16", "bf16 (autocast on GPU) | fp32; CPU always runs float32")
    compile: bool | None = _setting(None, "torch.compile each block (default: on CUDA without context_parallel, not "
                                               "on CPU)")
    activation_checkpointing: str = _setting("none", "none | selective (recompute the cheap element-wise work in "
                                                     "the backward) | full (recompute each block)")
    device: str = _setting("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    seed: int = _setting(0, "seed of the initial weights and of the data order")
    out_dir: str = _setting("runs/efla", "checkpoints/, model/, metrics.jsonl, train_config.json")
    save_every: int = _setting(1000, "checkpoint every N steps (also on SIGTERM/SIGINT and at the end)")
    keep_checkpoints: int = _setting(2, "newest checkpoints kept on disk")
    resume: str | None = _setting(None, "continue from the newest checkpoint in out_dir, or from CHECKPOINT")
    overwrite: bool = _setting(False, "start a new run in an out_dir that holds one, deleting its checkpoints, "
                                      "model and metrics")
    log_every: int = _setting(1, "steps between metrics records")
    val_every: int = _setting(0, "steps between validation losses (0: none); rows held out from the corpus")
    val_rows: int = _setting(32, "rows of seq_len tokens held out at the end of the corpus for validation (with "
                                 "val_every; they are never trained on)")
    wandb: bool = _setting(False, "also log to Weights & Biases (pip install wandb; WANDB_MODE=offline needs no "
                                  "network)")
    wandb_project: str = _setting("efla", "the Weights & Biases project")
    profile_steps: int = _setting(0, "profile this many steps (after 3 warm-up steps) with torch.profiler; rank 0 "
                                     "writes out_dir/profile.txt (operators by time) and profile_trace.json")
    def __post_init__(self) -> None:
        if isinstance(self.data, str):  # `data: corpus/` in a YAML file: one path, not a list of characters
            self.data = [self.data]
        hints = typing.get_type_hints(TrainConfig)
        for field in dataclasses.fields(self):
            setattr(self, field.name, _checked(field.name, getattr(self, field.name), hints[field.name]))
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp' (got {self.strategy!r})")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32' (got {self.precision!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} (got {self.schedule!r})")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(f"decay_ratio must be in (0, 1] (got {self.decay_ratio})")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (got {self.val_every}); 0: no validation")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING} "
                             f"(got {self.activation_checkpointing!r})")
        for name in ("context_parallel", "seq_len", "micro_batch_size", "grad_accum", "save_every", "keep_checkpoints",
                     "log_every", "val_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.seq_len is not None and self.seq_len < self.context_parallel:
            raise ValueError(f"seq_len {self.seq_len} must be >= context_parallel {self.context_parallel} (each rank "
                             "takes at least one token of every row): raise --seq-len or lower --context-parallel")
        if self.profile_steps < 0:
            raise ValueError(f"profile_steps must be >= 0 (got {self.profile_steps})")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps and max_tokens (the training budget)")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)}): a run must train")
        if self.resume is not None and self.overwrite:
            raise ValueError("give at most one of resume (continue the run in out_dir) and overwrite (replace it)")
        if bool(self.data) == (self.dataset is not None):
            raise ValueError("give exactly one of data (local files) and dataset (a Hugging Face datasets name)")
        if self.tokenizer is None:
            raise ValueError("tokenizer is required: a folder with a Hugging Face tokenizer "
                             "(build one with `efla tokenizer train`)")

    def total_steps(self, world_size: int) -> int:
        """Optimiser steps of the run: max_steps, or the token budget divided by the tokens per step (seq_len must
        be known); ``world_size`` counts the data-parallel ranks (the processes / context_parallel)."""
        if self.max_steps is not None:
            return self.max_steps
        if self.seq_len is None:
            raise ValueError("seq_len is needed to turn max_tokens into steps")
        return math.ceil(self.max_tokens / (self.seq_len * self.micro_batch_size * self.grad_accum * world_size))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per TrainConfig field (default None: "not given")."""
    parser.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig fields; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _base_type(hints[field.name])
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help_text = field.metadata["help"]
        if not (default is None and "default" in help_text):  # the help itself says what None means
            help_text += f" (default {default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, type=_json_object(flag), default=None, metavar="JSON", help=help_text)
        elif field.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="CHECKPOINT", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _json_object(flag: str) -> Callable[[str], dict[str, Any]]:
    """argparse type of ``flag``: a JSON object; anything else is refused with an example built from the input
    (``vocab_size=256`` -> ``'{"vocab_size": 256}'``)."""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"takes a JSON object, e.g. {flag} '{_json_example(text)}' "
                                             f"(got {text!r})")
        return value

    parse.__name__ = "JSON object"  # argparse names the type in some messages
    return parse


def _json_example(text: str) -> str:
    """``text``'s key=value pairs as a JSON object (values parsed as JSON where they can be), or a generic example."""
    pairs = [item.split("=", 1) for item in text.replace(",", " ").split() if "=" in item]
    if not pairs:
        return '{"attn_mode": "delta"}'

    def value(raw: str) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    return json.dumps({key.strip(): value(raw.strip()) for key, raw in pairs})


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the defaults, then the ``--config`` file, then the flags given."""
    values: dict[str, Any] = load_config_file(args.config) if args.config is not None else {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name)
        if value is not None:
            values[field.name] = value
    return TrainConfig(**values)


def load_config_file(path: Path) -> dict[str, Any]:
    """The key/value pairs of a YAML (.yaml/.yml, needs pyyaml) or JSON (.json) file, checked against TrainConfig's
    fields; a file with another suffix may hold either."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        values = _parse_json(text, path)
    elif path.suffix in (".yaml", ".yml"):
        values = _parse_yaml(text, path)
    else:
        try:
            values = _parse_json(text, path)
        except ValueError:
            try:
                values = _parse_yaml(text, path)
            except ValueError:
                raise ValueError(f"config file {path} is neither JSON nor YAML; give a .json or .yaml file of "
                                 "TrainConfig fields") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields (got {type(values).__name__})")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    return values


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {path} is not valid JSON: {error.msg} at line {error.lineno} column "
                         f"{error.colno}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as error:
        raise ImportError(f"config file {path}: YAML needs pyyaml (pip install pyyaml), or write it as JSON") from error
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config file {path} is not valid YAML: {problem}{where}") from None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type of the field ``name`` (annotation ``hint``), or a ValueError naming the key: booleans
    from booleans or true/false/yes/no/on/off/1/0, integers from integral numbers or numeric strings, floats from
    numbers or numeric strings."""
    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be given (got null)")
    kind = _base_type(hint)
    if kind is bool:
        if isinstance(value, bool):
            return value
        spelled = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if spelled in _TRUE or spelled in _FALSE:
            return spelled in _TRUE
        raise ValueError(f"{name} must be true or false (got {value!r})")
    if kind is int:
        number = _number(name, value, "an integer")
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"{name} must be an integer (got {value!r})")
        return int(number)
    if kind is float:
        return float(_number(name, value, "a number"))
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string (got {value!r}); quote it in a YAML file")
        return value
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{name} must be a list of strings (got {value!r})")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping (got {value!r})")
        return value
    return value


def _number(name: str, value: Any, what: str) -> int | float:
    """An int or float from a number or a numeric string (YAML 1.1 reads ``1e-3`` as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be {what} (got {value!r})")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".en") else int(value)
        except ValueError:
            raise ValueError(f"{name} must be {what} (got {value!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (got {value!r})")
    return value


def _base_type(hint: Any) -> type:
    """int for ``int | None``, list for ``list[str]``, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint
