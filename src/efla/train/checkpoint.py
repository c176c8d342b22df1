"""Checkpoints that survive a crash at any moment, for single-process, DDP and FSDP2 runs alike.

A checkpoint folder ``step_00000100`` holds ``model.safetensors`` and ``config.json`` (so it also loads with
``from_pretrained``), ``optimizer.pt``, ``trainer_state.pt`` (step, scheduler, data position) and ``rng_rank{r}.pt``
per rank. Model and optimizer state are full state dicts gathered to rank 0 through torch.distributed.checkpoint's
``get_state_dict`` (the same call for a plain, DDP or FSDP model) and loaded back with ``set_state_dict``, which
re-shards them for FSDP. Everything is written into ``step_00000100.tmp``, fsynced, and renamed; ``latest`` (a text
file, replaced atomically) then names the new folder, so a reader never sees a partial checkpoint.

``checksums.json`` holds the SHA-256 of every other file of the folder. ``find_checkpoint`` verifies it, so a
checkpoint damaged later (truncated, overwritten) is never resumed from: the newest intact one is used instead, and
the damaged folder is renamed ``step_00000100.damaged`` (kept for inspection, out of the rotation).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from efla.train.distributed import World, barrier

LATEST = "latest"
CHECKSUMS = "checksums.json"
_HASH_BLOCK = 1 << 24  # bytes read at a time when hashing


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
    world: World, keep: int,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` (all ranks call this), point ``latest`` at it and delete all
    but the newest ``keep`` checkpoints. Returns the checkpoint folder."""
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    _save(rng_state(), tmp / f"rng_rank{world.rank}.pt")
    if world.is_main:
        save_model(tmp, _plain(model), model_state)
        _save(optim_state, tmp / "optimizer.pt")
        _save(trainer_state, tmp / "trainer_state.pt")
    barrier(world)
    if world.is_main:
        _write_checksums(tmp)
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _replace_text(root / LATEST, final.name)
        _fsync_dir(root)
        # never the one just written: an older run or a resume from an earlier checkpoint can leave higher steps
        others = [p for p in sorted(root.glob("step_*[0-9]")) if p != final]
        for old in others[:max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old)
    barrier(world)
    return final


def find_checkpoint(resume: str, root: Path, warn: Callable[[str], None] = print) -> Path:
    """The checkpoint folder that ``--resume`` names, verified against its checksums.

    "latest": the checkpoint ``root/latest`` names, or when that one is damaged (or the pointer is missing) the
    newest intact ``step_*`` folder under ``root``; every damaged folder passed over is renamed ``*.damaged`` and
    reported through ``warn``. A path: that folder, which must be intact. Raises FileNotFoundError when there is no
    intact checkpoint to resume from."""
    if resume != LATEST:
        path = Path(resume).expanduser()
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder (no trainer_state.pt)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"--resume: checkpoint {path} is damaged ({problem}); resume from another checkpoint "
                             "or with --resume alone (the newest intact one)")
        return path
    pointer = root / LATEST
    named = [root / pointer.read_text().strip()] if pointer.is_file() else []
    steps = sorted((p for p in root.glob("step_*[0-9]") if p.is_dir()), reverse=True)
    candidates = list(dict.fromkeys(named + steps))
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {root}; drop --resume to start a new run, or pass a "
                                "checkpoint folder")
    damaged = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                warn(f"resuming from {path.name}, the newest intact checkpoint")
            return path
        damaged.append(f"{path.name}: {problem}")
        if path.is_dir():
            aside = path.with_name(path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            warn(f"checkpoint {path} is damaged ({problem}); moved it to {aside.name}")
    raise FileNotFoundError(f"--resume: no intact checkpoint in {root} ({'; '.join(damaged)}); start a new run "
                            "with --overwrite or another --out-dir")


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (a missing folder or file, a checksum that differs), or
    None when it is intact. A folder without checksums.json (written before checksums existed) is taken as intact
    when its files are present."""
    if not path.is_dir():
        return "missing"
    required = ("model.safetensors", "config.json", "optimizer.pt", "trainer_state.pt")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    if not (path / CHECKSUMS).is_file():
        return None
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    for name, digest in expected.items():
        if not (path / name).is_file():
            return f"no {name}"
        if _sha256(path / name) != digest:
            return f"{name} differs from its checksum"
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """Load weights, optimizer state and this rank's RNG state from ``path`` (all ranks call this); return the
    trainer state (step, scheduler, data position)."""
    model_state = _tie(load_file(path / "model.safetensors"), _plain(model))
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", mmap=True, weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return torch.load(path / "trainer_state.pt", weights_only=True)


def save_model(folder: Path, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Save a full state dict as ``model.safetensors`` plus the model's config.json (a from_pretrained folder).
    Tied weights are stored once, as transformers does."""
    folder.mkdir(parents=True, exist_ok=True)
    tied = _tied_keys(model)
    tensors = {k: v.contiguous() for k, v in state_dict.items() if k not in tied}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    _fsync_tree(folder)


def rng_state() -> dict[str, torch.Tensor]:
    """The torch CPU and CUDA generator states (the trainer draws its data order from its own seeded generator)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it is its own plain model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """{tied weight: the weight it shares} when the config ties them (transformers' _tied_weights_keys)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    return dict(getattr(model, "_tied_weights_keys", None) or {})


def _tie(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    for target, source in _tied_keys(model).items():
        state_dict.setdefault(target, state_dict[source])
    return state_dict


def _save(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_checksums(folder: Path) -> None:
    digests = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    with (folder / CHECKSUMS).open("w") as f:
        json.dump(digests, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
